"""The dependency direction of the package, checked on the import graph (imports inside functions count too).

core (tuner, `calibrate`, errors) <- lifecycle (status, gates, growth, registry, hub, model cards, sewl, search) <- CLI.
`peft_graft.testing` (local Hub server, asset loaders) is support for tests and benchmarks that no runtime module
imports, and `drm_transformer` is an ordinary transformers model that knows nothing of peft_graft (nor the reverse).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

LAYERS = {  # module prefix -> layer; the longest matching prefix wins (the bare package name only matches itself)
    "peft_graft": "core",
    "peft_graft._lazy": "core",
    "peft_graft._registration": "core",
    "peft_graft.errors": "core",
    "peft_graft.atomic": "core",
    "peft_graft.manifest": "core",
    "peft_graft.artifacts": "core",
    "peft_graft.calibration": "core",
    "peft_graft.calibration_callback": "core",
    "peft_graft.step_calibration": "core",
    "peft_graft.inspect_base": "core",
    "peft_graft.tuners": "core",
    "peft_graft.status": "lifecycle",
    "peft_graft.gates": "lifecycle",
    "peft_graft.growth": "lifecycle",
    "peft_graft.registry": "lifecycle",
    "peft_graft.hub": "lifecycle",
    "peft_graft.model_cards": "lifecycle",
    "peft_graft.sewl": "lifecycle",
    "peft_graft.search": "lifecycle",
    "peft_graft.signing": "lifecycle",
    "peft_graft.export": "lifecycle",
    "peft_graft.planning": "lifecycle",
    "peft_graft.cli": "cli",
    "peft_graft.search.__main__": "cli",  # `python -m peft_graft.search`: an entry point, like the CLI
    "peft_graft.testing": "testing",
    "drm_transformer": "drm",
}
# What each layer may import from this repository.
ALLOWED = {
    "core": {"core"},
    "lifecycle": {"core", "lifecycle"},
    "cli": {"core", "lifecycle", "cli"},
    "testing": {"core", "lifecycle", "testing"},
    "drm": {"drm"},
}
# Third-party packages the core may use: torch, peft, transformers, and what they ship with (safetensors, tqdm, packaging,
# huggingface_hub); bitsandbytes only for quantized bases (the `quantization` extra, imported lazily).
CORE_THIRD_PARTY = {
    "torch", "peft", "transformers", "safetensors", "tqdm", "huggingface_hub", "packaging", "bitsandbytes"
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "model_cards":  # installed as peft_graft.model_cards (setup.py)
        parts = ("peft_graft", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)  # `from . import x` imports a module
    return found


def _layer(name: str) -> str | None:
    matches = [p for p in LAYERS if name == p or ("." in p or p == "drm_transformer") and name.startswith(p + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


MODULES = sorted(
    p for package in ("peft_graft", "drm_transformer", "model_cards") for p in (ROOT / package).rglob("*.py")
)


def test_every_module_has_a_layer() -> None:
    unassigned = [_module_name(p) for p in MODULES if _layer(_module_name(p)) is None]
    assert not unassigned, f"add these modules to LAYERS: {unassigned}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_point_down_the_layers(path: Path) -> None:
    layer = _layer(_module_name(path))
    wrong = sorted(
        name for name in _imports(path) if _layer(name) is not None and _layer(name) not in ALLOWED[layer]
    )
    assert not wrong, f"{_module_name(path)} ({layer}) imports {wrong}"


@pytest.mark.parametrize("path", [p for p in MODULES if _layer(_module_name(p)) == "core"], ids=_module_name)
def test_core_uses_only_torch_peft_transformers(path: Path) -> None:
    third_party = {
        name.partition(".")[0]
        for name in _imports(path)
        if _layer(name) is None and name.partition(".")[0] not in sys.stdlib_module_names
    }
    assert third_party <= CORE_THIRD_PARTY, f"{_module_name(path)} imports {sorted(third_party - CORE_THIRD_PARTY)}"


def test_import_graph_sees_lazy_and_relative_imports() -> None:
    # The checker itself: a function-level import in the CLI and relative imports in the tuner are resolved.
    assert "peft_graft.registry" in _imports(ROOT / "peft_graft" / "cli.py")
    assert "peft_graft.errors" in _imports(ROOT / "peft_graft" / "tuners" / "graft" / "model.py")
    assert _layer("peft_graft.registry.audit") == "lifecycle" and _layer("peft_graft.tuners.graft.layer") == "core"


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(result.stdout.split())


def test_importing_the_core_loads_no_lifecycle_testing_or_model_package() -> None:
    loaded = _loaded_after("import peft_graft; import peft")  # peft's import registers the tuner
    leaked = sorted(m for m in loaded if _layer(m) not in (None, "core"))
    assert not leaked, f"`import peft_graft` also imports {leaked}"
    assert "peft_graft.tuners.graft" in loaded


def test_importing_the_package_alone_loads_no_model_library() -> None:
    # What makes `peft-graft --help` start at once: the tuner waits for peft (see peft_graft/_registration.py).
    loaded = _loaded_after("import peft_graft")
    assert not {"torch", "peft", "transformers"} & loaded
    assert "peft_graft.tuners.graft" not in loaded


def test_drm_transformer_does_not_load_peft_graft() -> None:
    loaded = _loaded_after("import drm_transformer")
    assert "drm_transformer.modeling_drm" in loaded
    assert not any(m.startswith("peft_graft") for m in loaded)


def test_lazy_top_level_names_resolve_and_unknown_names_fail() -> None:
    import peft_graft
    from peft_graft.calibration import calibrate
    from peft_graft.tuners.graft import GraftConfig

    assert peft_graft.GraftConfig is GraftConfig and peft_graft.calibrate is calibrate
    assert set(peft_graft.__all__) <= set(dir(peft_graft))
    with pytest.raises(AttributeError, match="no_such_name"):
        peft_graft.no_such_name  # noqa: B018


def test_manifest_spells_peft_file_names_as_peft_does() -> None:
    from peft.utils import constants

    from peft_graft import manifest

    for name in ("CONFIG_NAME", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME"):
        assert getattr(manifest, name) == getattr(constants, name)
