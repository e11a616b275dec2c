"""Small hooks into PEFT's save/load path, installed once when the tuner registers itself.

* Loading: a graft adapter folder whose weights file is missing, truncated or corrupt raises `AdapterFileError`
  naming the file and the fix, instead of PEFT's generic error (or, for a missing local file, an attempt to reach
  the Hub). Folders of other PEFT methods are passed through untouched.
* Failed loads: when `PeftModel.from_pretrained` or `load_adapter` fails after graft layers were injected (a
  shape or projection mismatch...), the model is rolled back exactly to what it was (see `rollback.py`).
* Saving: the model card PEFT writes gets a "how to load" section, because loading a GRAFT adapter without
  ``import peft_graft`` fails with a bare ``KeyError('GRAFT')`` from PEFT.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import peft.peft_model
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME

from ...atomic import atomic_write_text
from ...errors import AdapterFileError
from .peft_type import GRAFT_PEFT_TYPE
from .rollback import ModelSnapshot


LOADING_SECTION = """## Loading this graft adapter

This adapter was made with [peft-graft](https://pypi.org/project/peft-graft/). PEFT only knows the GRAFT method
after the plugin is imported (otherwise it raises `KeyError: 'GRAFT'`):

```python
import peft_graft  # registers GRAFT with PEFT
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "<this folder or repo id>")
```
"""


def _local_graft_dir(model_id: Any, subfolder: str | None) -> str | None:
    """The local folder of ``model_id`` if it holds a GRAFT adapter config, else None."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    path = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        return None
    try:
        with open(config_file, encoding="utf-8") as f:
            peft_type = json.load(f).get("peft_type")
    except (OSError, ValueError):
        return None
    return path if peft_type == GRAFT_PEFT_TYPE.value else None


def _guard_loading(load: Callable[..., dict]) -> Callable[..., dict]:
    @functools.wraps(load)
    def load_peft_weights(model_id: str, *args: Any, **kwargs: Any) -> dict:
        path = _local_graft_dir(model_id, kwargs.get("subfolder"))
        if path is None:
            return load(model_id, *args, **kwargs)
        weights = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise AdapterFileError(
                f"{weights} is missing: the graft adapter in {path} has a config but no weights. The save was "
                "interrupted or the file was moved; save the adapter again or restore the file."
            )
        try:
            return load(model_id, *args, **kwargs)
        except Exception as err:  # safetensors raises its own error types, none of them OSError
            raise AdapterFileError(
                f"{weights} ({os.path.getsize(weights):,} bytes) is not a valid safetensors file ({err}). It is "
                "probably truncated or corrupt: save the adapter again or restore the file."
            ) from err

    load_peft_weights.__graft_guard__ = True
    return load_peft_weights


def _roll_back_failed_from_pretrained(from_pretrained: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(from_pretrained)
    def wrapper(cls: type, model: Any, model_id: Any, adapter_name: str = "default", *args: Any, **kwargs: Any):
        snapshot = ModelSnapshot.take(model)
        try:
            return from_pretrained(cls, model, model_id, adapter_name, *args, **kwargs)
        except BaseException:
            if snapshot.injected_grafts(adapter_name):
                snapshot.restore(adapter_name)
            raise

    wrapper.__graft_guard__ = True
    return wrapper


def _roll_back_failed_load_adapter(load_adapter: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load_adapter)
    def wrapper(self: peft.peft_model.PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any):
        snapshot, known = ModelSnapshot.take(self), set(self.peft_config)
        try:
            return load_adapter(self, model_id, adapter_name, *args, **kwargs)
        except BaseException:
            if snapshot.injected_grafts(adapter_name):
                snapshot.restore(adapter_name)
                if adapter_name not in known:
                    self.peft_config.pop(adapter_name, None)
            raise

    wrapper.__graft_guard__ = True
    return wrapper


def _add_loading_section(create: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(create)
    def create_or_update_model_card(self: peft.peft_model.PeftModel, output_dir: str) -> None:
        create(self, output_dir)
        if not any(c.peft_type == GRAFT_PEFT_TYPE for c in self.peft_config.values()):
            return
        filename = os.path.join(output_dir, "README.md")
        with open(filename, encoding="utf-8") as f:
            text = f.read()
        if LOADING_SECTION not in text:
            atomic_write_text(filename, text.rstrip() + "\n\n" + LOADING_SECTION)

    create_or_update_model_card.__graft_guard__ = True
    return create_or_update_model_card


def install() -> None:
    """Install the hooks (idempotent)."""
    peft_model = peft.peft_model.PeftModel
    if not getattr(peft.peft_model.load_peft_weights, "__graft_guard__", False):
        peft.peft_model.load_peft_weights = _guard_loading(peft.peft_model.load_peft_weights)
    from_pretrained = peft_model.__dict__["from_pretrained"].__func__
    if not getattr(from_pretrained, "__graft_guard__", False):
        peft_model.from_pretrained = classmethod(_roll_back_failed_from_pretrained(from_pretrained))
    if not getattr(peft_model.load_adapter, "__graft_guard__", False):
        peft_model.load_adapter = _roll_back_failed_load_adapter(peft_model.load_adapter)
    card = peft.peft_model.PeftModel.create_or_update_model_card
    if not getattr(card, "__graft_guard__", False):
        peft.peft_model.PeftModel.create_or_update_model_card = _add_loading_section(card)
