"""Register the GRAFT method with PEFT as soon as peft is imported, without importing peft (seconds) ourselves.

A user who writes ``import peft_graft`` and then loads a graft adapter through plain PEFT or transformers never
touches a peft_graft name again, so registration cannot wait for attribute access. Instead a meta-path finder waits
for the first ``import peft`` anywhere in the program and registers the tuner the moment peft's own ``__init__`` has
run, before the importer gets the module back. If peft is already imported, registration happens at once.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import import_module
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType


_TUNER = "peft_graft.tuners.graft"  # registers GRAFT with PEFT when imported (idempotent)


def register_now() -> None:
    import_module(_TUNER)


class _RegisterAfterPeft(MetaPathFinder):
    """Finds nothing itself: it hands out peft's own spec with a loader that registers GRAFT after executing peft."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one use: later imports of peft find it in sys.modules
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None  # peft is not installed: the import fails as it would without us
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            del loader.exec_module  # the instance attribute set below; the loader's own method is back
            execute(module)
            register_now()

        loader.exec_module = exec_then_register
        return spec


def register_when_peft_is_imported() -> None:
    """Register now if peft is loaded, else on its first import; calling this again changes nothing."""
    if "peft" in sys.modules:
        register_now()
    elif not any(isinstance(finder, _RegisterAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())
