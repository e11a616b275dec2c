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
* transformers' own adapter API (``model.load_adapter(path_or_repo)`` on a transformers model, no PeftModel) loads
  through neither of the above: it injects the layers itself and copies the weights in without
  ``nn.Module.load_state_dict``, only logging missing keys. For a graft adapter its load is wrapped the same way:
  config, tensors and manifest are checked before anything is injected, the checks the graft layers make in their
  ``load_state_dict`` hooks (base shape, regenerated-projection fingerprint) and the missing-module check run after
  the copy, and any failure restores the model exactly and raises a typed error. Other adapters are passed through.
* Loading computes nothing the file holds: inside every wrapped load, graft layers leave the projections the
  config stores (svd, activation, gradient, trainable) as placeholders for the file's tensors instead of running an
  SVD of each target module (`layer.loading_from_file`); the checks above refuse a file that lacks them.
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
import transformers.integrations.peft
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
)
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors.torch import load_file

from ...atomic import atomic_write_text
from ...errors import (
    AdapterContentError,
    AdapterFileError,
    PeftGraftError,
    ShapeMismatchError,
    UnsafeSerializationError,
)
from ...manifest import MANIFEST_NAME, check_manifest, write_manifest
from .integrity import (
    check_loaded_modules,
    check_tensors,
    read_config,
)
from .layer import GraftLayer, loading_from_file
from .peft_type import GRAFT_PEFT_TYPE
from .projections import GraftProjection
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


_MISSING_ON_HUB = (EntryNotFoundError, RemoteEntryNotFoundError, LocalEntryNotFoundError)


def _hub_download_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a load that say which Hub files it reads, as `hf_hub_download` takes them."""
    return {k: kwargs[k] for k in ("subfolder", "revision", "token", "cache_dir") if kwargs.get(k) is not None}


def _hub_graft_dir(model_id: Any, kwargs: dict[str, Any]) -> str | None:
    """For a Hub repo id: the cached snapshot folder of its graft adapter, with the repo's manifest fetched into it
    when the repo has one; None for anything else. PEFT has just downloaded the config into that folder (the weights
    go there too), so nothing new is fetched but the small manifest."""
    if not isinstance(model_id, str) or os.path.isdir(model_id):
        return None
    download = _hub_download_kwargs(kwargs)
    try:
        config_file = hf_hub_download(model_id, CONFIG_NAME, **download)
    except (*_MISSING_ON_HUB, HfHubHTTPError, ValueError):  # not a repo PEFT can read either: PEFT reports it
        return None
    if str(_peft_type(config_file)).upper() != GRAFT_PEFT_TYPE.value:
        return None
    with contextlib.suppress(*_MISSING_ON_HUB):  # repos pushed before manifests existed get the structural checks only
        hf_hub_download(model_id, MANIFEST_NAME, **download)
    return os.path.dirname(config_file)


def _missing_weights_error(weights: str, folder: str) -> AdapterFileError:
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        return AdapterFileError(
            f"{folder} holds graft weights as a pickle ({WEIGHTS_NAME}) and no {SAFETENSORS_WEIGHTS_NAME}: "
            "peft-graft loads safetensors only, since unpickling a file runs the code it holds. Save the adapter "
            "again with safe_serialization=True, from a source you trust."
        )
    return AdapterFileError(
        f"{weights} is missing: the graft adapter in {folder} has a config but no weights. The save was "
        "interrupted or the file was moved; save the adapter again or restore the file."
    )


def _corrupt_weights_error(weights: str, err: Exception) -> AdapterFileError:
    size = f"{os.path.getsize(weights):,} bytes" if os.path.isfile(weights) else "not readable"
    return AdapterFileError(
        f"{weights} ({size}) is not a valid safetensors file ({err}). It is probably truncated or corrupt: "
        "save the adapter again or restore the file."
    )


def _not_graft_weights(tensors: dict, model_id: Any) -> dict:
    """Weights loaded for another method must not be a graft's: an adapter_config.json whose peft_type was changed
    would make PEFT build, say, LoRA layers and only warn that their keys are missing."""
    graft_key = next((key for key in tensors if ".graft_phi." in key or ".graft_proj." in key), None)
    if graft_key is not None:
        raise AdapterContentError(
            f"{model_id}: the weights are a graft adapter's ({graft_key!r}), but adapter_config.json names another "
            f"method. The config was changed or belongs to another adapter; restore it from a good copy."
        )
    return tensors


def _guard_loading(load: Callable[..., dict]) -> Callable[..., dict]:
    @functools.wraps(load)
    def load_peft_weights(model_id: str, *args: Any, **kwargs: Any) -> dict:
        path = _local_graft_dir(model_id, kwargs.get("subfolder"))
        if path is None:
            path = _hub_graft_dir(model_id, kwargs)
            if path is None:
                return _not_graft_weights(load(model_id, *args, **kwargs), model_id)
        weights = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isdir(model_id) and not os.path.isfile(weights):
            raise _missing_weights_error(weights, path)
        config = read_config(path)
        try:
            tensors = load(model_id, *args, **kwargs)
        except Exception as err:  # safetensors raises its own error types, none of them OSError
            raise _corrupt_weights_error(weights, err) from err
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
            with loading_from_file():
                return from_pretrained(cls, model, model_id, adapter_name, *args, **kwargs)
        except BaseException as err:
            if snapshot.injected_grafts(adapter_name):
                snapshot.restore(adapter_name)
            typed = (
                _unknown_method_error(err, model_id, kwargs.get("subfolder")) if isinstance(err, KeyError) else None
            )
            if typed is not None:
                raise typed from err
            raise

    wrapper.__graft_guard__ = True
    return wrapper


def _lacks_saved_module_error(model_id: Any, key: str) -> AdapterContentError:
    return AdapterContentError(
        f"{model_id} lacks {key!r}, which its config (modules_to_save) makes the model expect. The file is damaged "
        "or adapter_config.json was changed; restore the folder or save the adapter again."
    )


def _typed_state_dict_error(err: KeyError | RuntimeError, model_id: Any) -> PeftGraftError | None:
    """PEFT's own errors for a file that lacks, or has a wrong-shape, ``modules_to_save`` tensor (the graft tensors
    were checked before), as typed errors; None for any other error."""
    if isinstance(err, KeyError):
        return _lacks_saved_module_error(model_id, err.args[0])
    if "size mismatch" in str(err) or "ignore_mismatched_sizes" in str(err):  # PEFT's wording, transformers'
        return ShapeMismatchError(f"{model_id} does not fit this base model: {err}")
    return None


def _roll_back_failed_load_adapter(load_adapter: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load_adapter)
    def wrapper(self: peft.peft_model.PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any):
        snapshot, known = ModelSnapshot.take(self), set(self.peft_config)
        try:
            try:
                with loading_from_file():
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


# ------------------------------------------------------------------ transformers' own adapter API


def _transformers_download_kwargs(call: dict[str, Any]) -> dict[str, Any]:
    """Where transformers' ``load_adapter`` will download from: its ``load_config``, then ``adapter_kwargs`` (which
    it applies only when it reads the config itself, i.e. without ``peft_config``)."""
    download = dict(getattr(call["load_config"], "download_kwargs", None) or {})
    download.update(call["kwargs"].get("download_kwargs") or {})
    if call["peft_config"] is None:
        download.update(call["adapter_kwargs"] or {})
    return download


def _hub_adapter_dir(model_id: str, download: dict[str, Any]) -> str:
    """Fetch a Hub adapter's weights, and its config and manifest when it has them, into the cache; return the
    snapshot folder holding them."""
    download = _hub_download_kwargs(download)
    try:
        weights = hf_hub_download(model_id, SAFETENSORS_WEIGHTS_NAME, **download)
    except _MISSING_ON_HUB as err:
        raise AdapterFileError(
            f"{model_id} has no {SAFETENSORS_WEIGHTS_NAME} ({err}): graft adapters are loaded from safetensors "
            "weights. Push the adapter folder again, including its weights."
        ) from err
    for name in (CONFIG_NAME, MANIFEST_NAME):
        with contextlib.suppress(*_MISSING_ON_HUB):
            hf_hub_download(model_id, name, **download)
    return os.path.dirname(weights)


def _read_weights(folder: str) -> dict[str, Any]:
    weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise _missing_weights_error(weights, folder)
    try:
        return load_file(weights)
    except Exception as err:  # safetensors' own error types
        raise _corrupt_weights_error(weights, err) from err


def _transformers_adapter_dir(call: dict[str, Any], config: Any) -> str | None:
    """The local folder of what transformers' ``load_adapter`` reads from ``peft_model_id`` (a Hub repo's files are
    fetched into the cache first); None without one or when, with no ``config`` given, its config is not a graft's."""
    model_id = call["peft_model_id"] or getattr(call["load_config"], "pretrained_model_name_or_path", None)
    if model_id is None:
        return None  # nothing to load: transformers says so
    download = _transformers_download_kwargs(call)
    if isinstance(model_id, (str, os.PathLike)) and os.path.isdir(model_id):
        if config is None:
            return _local_graft_dir(model_id, download.get("subfolder"))
        return os.path.join(model_id, download.get("subfolder") or "")
    if config is None and _hub_graft_dir(model_id, download) is None:
        return None
    return _hub_adapter_dir(model_id, download)


def _check_transformers_source(call: dict[str, Any]) -> str | None:
    """Check what transformers' ``load_adapter`` was asked to load, before it injects anything; return how messages
    name the adapter, or None when it is not a graft adapter (then nothing is checked).

    transformers takes the config from ``peft_config``, else from the adapter folder (local, or a Hub repo), and the
    tensors from ``adapter_state_dict``, else from the folder's weights. They get the checks of
    `peft_graft.artifacts.verify_adapter`, in its order: config, tensors against the config, then the manifest.
    """
    config, tensors = call["peft_config"], call["adapter_state_dict"]
    if config is not None and getattr(config, "peft_type", None) != GRAFT_PEFT_TYPE:
        return None
    folder = None
    if config is None or tensors is None:  # the folder supplies the config, the weights or both
        folder = _transformers_adapter_dir(call, config)
        if folder is None:
            return None
    if config is None:
        config = read_config(folder)
    if tensors is None:
        check_tensors(_read_weights(folder), config, os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
    else:
        check_tensors(tensors, config, "adapter_state_dict")
    if folder is None:
        return "adapter_state_dict"
    check_manifest(folder)
    return folder


def _check_transformers_result(model: Any, adapter_name: str, missing_keys: Any, source: str) -> None:
    """After transformers copied the tensors in: what PEFT's load checks in the graft layers' ``load_state_dict``
    hooks (which transformers' loader does not run) and after it, for every layer that received ``adapter_name``."""
    for name, layer in model.named_modules():
        if not isinstance(layer, GraftLayer) or adapter_name not in layer.graft_proj:
            continue
        projection, prefix = layer.graft_proj[adapter_name], f"{name}.graft_proj.{adapter_name}."
        # The layer's own projection as it was before the copy overwrote its signature with the saved one: the
        # projection's load hook then compares the saved base shape and fingerprint with it, as in PEFT's load.
        own = GraftProjection(
            projection.A.detach(),
            projection.B.detach(),
            (layer.out_features, layer.in_features),
            trainable=False,
            stored=projection.stored,
        )
        own._verify_incoming({prefix + "signature": projection.signature}, prefix)
    check_loaded_modules(missing_keys, adapter_name, source)
    missing = sorted(k for k in missing_keys if f".modules_to_save.{adapter_name}." in k)
    if missing:
        raise _lacks_saved_module_error(source, missing[0])
    for layer in model.modules():
        if isinstance(layer, GraftLayer) and adapter_name in layer.graft_phi:
            layer.graft_pending[adapter_name] = ()  # its state came from the file: no calibration needed


def _guard_transformers_load_adapter(load_adapter: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(load_adapter)

    @functools.wraps(load_adapter)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        source = _check_transformers_source(call.arguments)
        if source is None:
            return load_adapter(self, *args, **kwargs)
        adapter_name = call.arguments["adapter_name"] or "default"
        snapshot = ModelSnapshot.take(self)
        try:
            try:
                with loading_from_file():
                    loading_info = load_adapter(self, *args, **kwargs)
            except RuntimeError as err:
                typed = _typed_state_dict_error(err, source)
                if typed is None:
                    raise
                raise typed from err
            except OSError as err:  # a file that changed or went away since it was checked
                if isinstance(err, PeftGraftError):
                    raise
                raise AdapterFileError(f"{source} could not be read ({err}). Restore the adapter folder.") from err
            _check_transformers_result(self, adapter_name, loading_info.missing_keys, source)
            return loading_info
        except BaseException:
            snapshot.restore(adapter_name)
            raise

    wrapper.__graft_guard__ = True
    return wrapper


def _write_manifests(save_pretrained: Callable[..., None]) -> Callable[..., None]:
    signature = inspect.signature(save_pretrained)

    @functools.wraps(save_pretrained)
    def wrapper(self: peft.peft_model.PeftModel, *args: Any, **kwargs: Any) -> None:
        call = signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        grafts = [
            name
            for name in call.arguments["selected_adapters"] or list(self.peft_config)
            if name in self.peft_config and self.peft_config[name].peft_type == GRAFT_PEFT_TYPE
        ]
        if grafts and not call.arguments["safe_serialization"]:
            raise UnsafeSerializationError(
                f"safe_serialization=False would write graft adapter(s) {grafts} as a pickle (adapter_model.bin), "
                "which peft-graft never loads: unpickling a file runs the code it holds. Save with "
                "safe_serialization=True (the default) to get adapter_model.safetensors."
            )
        save_pretrained(self, *args, **kwargs)
        if not call.arguments["is_main_process"]:  # other ranks write no files
            return
        save_directory = call.arguments["save_directory"]
        for adapter_name in grafts:
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
    mixin = transformers.integrations.peft.PeftAdapterMixin
    if not getattr(mixin.load_adapter, "__graft_guard__", False):
        mixin.load_adapter = _guard_transformers_load_adapter(mixin.load_adapter)
