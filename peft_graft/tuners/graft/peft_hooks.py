"""Small hooks into PEFT's save/load path, installed once when the tuner registers itself.

* Loading: a graft adapter folder whose weights file is missing, truncated or corrupt raises `AdapterFileError`
  naming the file and the fix, instead of PEFT's generic error (or, for a missing local file, an attempt to reach
  the Hub). Folders of other PEFT methods are passed through untouched.
* Failed loads: when `PeftModel.from_pretrained` or `load_adapter` fails after graft layers were injected (a
  shape or projection mismatch...), the model is rolled back exactly to what it was (see `rollback.py`).
* Integrity: every save of a graft adapter ends with a checksum manifest (``graft_manifest.json``, see
  `integrity.py`) written after PEFT wrote the config and weights. Every load of a local graft folder holds the
  weights to what the config allows before PEFT copies them into the model, then refuses a load that left a
  targeted module without its graft weights (PEFT only warns), then checks the manifest when there is one. The
  precise checks come first so their errors name the defect; all run inside the wrapped load, so a refused
  adapter also rolls the model back.
* Saving: the model card PEFT writes gets a "how to load" section, because loading a GRAFT adapter without
  ``import peft_graft`` fails with a bare ``KeyError('GRAFT')`` from PEFT.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

import peft.peft_model
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
)
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ...atomic import atomic_write_text
from ...errors import AdapterContentError, AdapterFileError, PeftGraftError, ShapeMismatchError
from .integrity import (
    MANIFEST_NAME,
    check_loaded_modules,
    check_manifest,
    check_tensors,
    read_config,
    write_manifest,
)
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
    """The local folder of ``model_id`` if it holds a GRAFT adapter config or a graft manifest, else None (a
    manifest beside another ``peft_type`` means the config was changed: the manifest check then refuses it)."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    path = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        return None
    peft_type = _peft_type(config_file)
    is_graft = str(peft_type).upper() == GRAFT_PEFT_TYPE.value or os.path.isfile(os.path.join(path, MANIFEST_NAME))
    return path if is_graft else None


def _peft_type(config_file: str) -> Any:
    """The ``peft_type`` an adapter_config.json names (None if unreadable)."""
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config.get("peft_type") if isinstance(config, dict) else None


def _hub_graft_dir(model_id: Any, kwargs: dict[str, Any]) -> str | None:
    """For a Hub repo id: the cached snapshot folder of its graft adapter, with the repo's manifest fetched into it
    when the repo has one; None for anything else. PEFT has just downloaded the config into that folder (the weights
    go there too), so nothing new is fetched but the small manifest."""
    if not isinstance(model_id, str) or os.path.isdir(model_id):
        return None
    download = {k: kwargs[k] for k in ("subfolder", "revision", "token", "cache_dir") if kwargs.get(k) is not None}
    missing = (EntryNotFoundError, RemoteEntryNotFoundError, LocalEntryNotFoundError)
    try:
        config_file = hf_hub_download(model_id, CONFIG_NAME, **download)
    except (*missing, HfHubHTTPError, ValueError):  # not a repo PEFT can read either: PEFT reports it
        return None
    if str(_peft_type(config_file)).upper() != GRAFT_PEFT_TYPE.value:
        return None
    with contextlib.suppress(*missing):  # repos pushed before manifests existed get the structural checks only
        hf_hub_download(model_id, MANIFEST_NAME, **download)
    return os.path.dirname(config_file)


def _guard_loading(load: Callable[..., dict]) -> Callable[..., dict]:
    @functools.wraps(load)
    def load_peft_weights(model_id: str, *args: Any, **kwargs: Any) -> dict:
        path = _local_graft_dir(model_id, kwargs.get("subfolder"))
        if path is None:
            path = _hub_graft_dir(model_id, kwargs)
            if path is None:
                return load(model_id, *args, **kwargs)
        weights = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isdir(model_id) and not os.path.isfile(weights):
            raise AdapterFileError(
                f"{weights} is missing: the graft adapter in {path} has a config but no weights. The save was "
                "interrupted or the file was moved; save the adapter again or restore the file."
            )
        config = read_config(path)
        try:
            tensors = load(model_id, *args, **kwargs)
        except Exception as err:  # safetensors raises its own error types, none of them OSError
            size = f"{os.path.getsize(weights):,} bytes" if os.path.isfile(weights) else "not readable"
            raise AdapterFileError(
                f"{weights} ({size}) is not a valid safetensors file ({err}). It is probably truncated or corrupt: "
                "save the adapter again or restore the file."
            ) from err
        check_tensors(tensors, config, weights)
        if not os.path.isdir(model_id):
            check_manifest(path)  # a Hub snapshot: its files as downloaded, against the repo's manifest
        return tensors

    load_peft_weights.__graft_guard__ = True
    return load_peft_weights


def _unknown_method_error(err: KeyError, model_id: Any, subfolder: str | None) -> PeftGraftError | None:
    """PEFT's ``KeyError`` for a method name it does not know, when a graft folder's config names one (an edited
    ``peft_type``), as a typed error; None for any other ``KeyError``."""
    path = _local_graft_dir(model_id, subfolder)
    config_file = os.path.join(path, "adapter_config.json") if path else None
    if config_file is None or not err.args or err.args[0] != _peft_type(config_file):
        return None
    check_manifest(path)  # a config changed after saving fails here, naming the file and both hashes
    return AdapterFileError(
        f"{config_file} names the PEFT method {err.args[0]!r}, which PEFT does not know; a graft adapter says "
        f"{GRAFT_PEFT_TYPE.value!r}. Restore the file or save the adapter again."
    )


def _roll_back_failed_from_pretrained(from_pretrained: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(from_pretrained)
    def wrapper(cls: type, model: Any, model_id: Any, adapter_name: str = "default", *args: Any, **kwargs: Any):
        snapshot = ModelSnapshot.take(model)
        try:
            return from_pretrained(cls, model, model_id, adapter_name, *args, **kwargs)
        except BaseException as err:
            if snapshot.injected_grafts(adapter_name):
                snapshot.restore(adapter_name)
            typed = _unknown_method_error(err, model_id, kwargs.get("subfolder")) if isinstance(err, KeyError) else None
            if typed is not None:
                raise typed from err
            raise

    wrapper.__graft_guard__ = True
    return wrapper


def _typed_state_dict_error(err: KeyError | RuntimeError, model_id: Any) -> PeftGraftError | None:
    """PEFT's own errors for a file that lacks, or has a wrong-shape, ``modules_to_save`` tensor (the graft tensors
    were checked before), as typed errors; None for any other error."""
    if isinstance(err, KeyError):
        return AdapterContentError(
            f"{model_id} lacks {err.args[0]!r}, which its config (modules_to_save) makes the model expect. The file "
            "is damaged or adapter_config.json was changed; restore the folder or save the adapter again."
        )
    if "size mismatch" in str(err):
        return ShapeMismatchError(f"{model_id} does not fit this base model: {err}")
    return None


def _roll_back_failed_load_adapter(load_adapter: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load_adapter)
    def wrapper(self: peft.peft_model.PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any):
        snapshot, known = ModelSnapshot.take(self), set(self.peft_config)
        try:
            try:
                load_result = load_adapter(self, model_id, adapter_name, *args, **kwargs)
            except (KeyError, RuntimeError) as err:
                if getattr(self.peft_config.get(adapter_name), "peft_type", None) != GRAFT_PEFT_TYPE:
                    raise
                typed = _typed_state_dict_error(err, model_id)
                if typed is None:
                    raise
                raise typed from err
            path = _local_graft_dir(model_id, kwargs.get("subfolder"))
            if self.peft_config[adapter_name].peft_type == GRAFT_PEFT_TYPE:
                check_loaded_modules(load_result.missing_keys, adapter_name, path or model_id)
            if path is not None:
                # Last, so the structural and base-model checks above and in PEFT's load name a precise defect
                # first; the manifest then refuses every remaining change of the saved bytes.
                check_manifest(path)
            return load_result
        except BaseException:
            if snapshot.injected_grafts(adapter_name):
                snapshot.restore(adapter_name)
                if adapter_name not in known:
                    self.peft_config.pop(adapter_name, None)
            raise

    wrapper.__graft_guard__ = True
    return wrapper


def _write_manifests(save_pretrained: Callable[..., None]) -> Callable[..., None]:
    signature = inspect.signature(save_pretrained)

    @functools.wraps(save_pretrained)
    def wrapper(self: peft.peft_model.PeftModel, *args: Any, **kwargs: Any) -> None:
        save_pretrained(self, *args, **kwargs)
        call = signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        if not call.arguments["is_main_process"]:  # other ranks write no files
            return
        save_directory = call.arguments["save_directory"]
        for adapter_name in call.arguments["selected_adapters"] or list(self.peft_config):
            if self.peft_config[adapter_name].peft_type == GRAFT_PEFT_TYPE:
                # PEFT's own rule for where a named adapter goes; config and weights are written by now.
                folder = save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)
                write_manifest(folder)

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
    if not getattr(peft_model.save_pretrained, "__graft_guard__", False):
        peft_model.save_pretrained = _write_manifests(peft_model.save_pretrained)
    card = peft.peft_model.PeftModel.create_or_update_model_card
    if not getattr(card, "__graft_guard__", False):
        peft.peft_model.PeftModel.create_or_update_model_card = _add_loading_section(card)
