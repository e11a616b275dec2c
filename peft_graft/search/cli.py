"""What `peft-graft sensitivity` and `peft-graft search` do, given their parsed arguments.

Data files are plain text (tokenized with the model folder's tokenizer, cut into blocks) or ``.json`` files holding a
list of equally long token-id lists (for models without a tokenizer, and for exact control over the blocks). A search
is described by a YAML (needs PyYAML) or JSON file; command-line flags override its top-level settings.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import EmptySearchDataError, SearchConfigError
from ..tuners.graft import GraftConfig


GATE_DEFAULTS = {"min_gain": 0.0, "max_regression": 0.02, "exact_recomposition": True}


def load_blocks(
    path: str | Path, model_dir: str | Path, block_size: int, max_blocks: int | None = None
) -> torch.Tensor:
    """[N, block_size] token ids from a text file (the model's tokenizer) or a JSON list of token-id lists."""
    path = Path(path)
    if not path.is_file():
        raise SearchConfigError(f"Data file {path} does not exist.")
    if path.suffix == ".json":
        try:
            blocks = torch.tensor(json.loads(path.read_text(encoding="utf-8")), dtype=torch.int64)
        except (ValueError, TypeError) as err:
            raise SearchConfigError(f"{path} must hold a JSON list of equally long token-id lists ({err}).") from err
    else:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(model_dir)(path.read_text(encoding="utf-8"))["input_ids"]
        usable = len(ids) // block_size * block_size
        blocks = torch.tensor(ids[:usable], dtype=torch.int64).reshape(-1, block_size)
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise EmptySearchDataError(f"{path} gave no block of {block_size} tokens; give more text or smaller blocks.")
    return blocks[:max_blocks]


def _model(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def sensitivity(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the map of ``args.model`` on ``args.data``; write JSON (``--out``) and a heat map (``--plot``)."""
    from .sensitivity import sensitivity_map

    blocks = load_blocks(args.data, args.model, args.block_size, args.blocks)
    projections = GraftConfig(r=args.r, projection=args.projection)
    smap = sensitivity_map(_model(args.model), blocks, projections, args.target_modules, args.batch_size)
    report = {
        "modules": len(smap.modules),
        "examples": smap.examples,
        "loss": smap.loss,
        "top": [m.name for m in smap.ranked(args.score)[:5]],
    }
    if args.out:
        report["map"] = str(smap.save(args.out))
    if args.plot:
        from .plots import heat_map

        report["heat_map"] = str(heat_map(smap, args.plot, args.score))
    return report


def read_search_file(path: str | Path) -> dict[str, Any]:
    """The settings of a search from YAML or JSON."""
    path = Path(path)
    if not path.is_file():
        raise SearchConfigError(f"Search file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise SearchConfigError(f"Reading {path} needs PyYAML (pip install pyyaml); or write it as JSON.") from err
        settings = yaml.safe_load(text)
    else:
        settings = json.loads(text)
    if not isinstance(settings, dict):
        raise SearchConfigError(f"{path} must hold a mapping of settings, got {type(settings).__name__}.")
    return settings


@dataclass
class SearchInputs:
    """Everything a search needs, read from its file and flags; every process of a launch reads the same."""

    base: Any
    data: Any  # GrowthData
    gates: Any  # GateSet
    config: Any  # SearchConfig
    out: Path
    registry_root: Path
    plot: bool
    distributed: dict[str, Any]  # the ``distributed`` section (roles, heartbeat), read by `distributed`


def search_inputs(args: argparse.Namespace) -> SearchInputs:
    """The search a search file describes (flags override it), checked and loaded; nothing is written."""
    from ..gates import ExactRecomposition, FiniteWeights, GateSet, GrowthData, MinimumGain, ParameterBudget, Retention
    from .router import SearchSpace
    from .stages import SearchConfig

    settings = read_search_file(args.config) if args.config else {}
    for key in ("model", "budget", "max_stages", "out", "registry"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    missing = [k for k in ("model", "data", "budget", "out") if k not in settings]
    if missing:
        raise SearchConfigError(f"The search needs {', '.join(missing)} (in the search file or as flags).")
    data_files = settings["data"]
    if not isinstance(data_files, dict) or not {"train", "acceptance", "ranking"} <= set(data_files):
        raise SearchConfigError("data must map train, acceptance and ranking (and optionally retention) to files.")
    block_size = settings.get("block_size", 64)
    data = GrowthData(**{role: load_blocks(file, settings["model"], block_size) for role, file in data_files.items()})
    gate_settings = GATE_DEFAULTS | settings.get("gates", {})
    gates = [MinimumGain(min_gain=gate_settings["min_gain"]), FiniteWeights(), ParameterBudget(settings["budget"])]
    if data.retention is not None:
        gates.append(Retention(max_regression=gate_settings["max_regression"]))
    if gate_settings["exact_recomposition"]:
        gates.append(ExactRecomposition(rtol=1e-5))
    space = SearchSpace(
        **{
            k: tuple(v) if isinstance(v, list) and k != "target_modules" else v
            for k, v in settings.get("space", {}).items()
        }
    )
    known = {f for f in SearchConfig.__dataclass_fields__ if f not in ("budget", "space")}
    own = {"model", "data", "budget", "space", "gates", "out", "registry", "block_size", "distributed"}
    unknown = set(settings) - known - own
    if unknown:
        raise SearchConfigError(f"Unknown search settings {sorted(unknown)}; known: {sorted(known)}.")
    config = SearchConfig(
        budget=settings["budget"],
        space=space,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k in known},
    )
    return SearchInputs(
        _model(settings["model"]),
        data,
        GateSet(gates),
        config,
        Path(settings["out"]),
        Path(settings.get("registry") or Path(settings["out"]) / "registry"),
        not getattr(args, "no_plot", False),
        settings.get("distributed") or {},
    )


def search(args: argparse.Namespace) -> dict[str, Any]:
    """Run the staged search a search file describes (flags override it); write its report; return a summary.

    Under ``accelerate launch``/``torchrun`` with more than one process, the processes search together
    (`distributed`): rank 0 coordinates and writes; the summary of another rank names its rank only.
    """
    from ..registry import GraftRegistry
    from .channel import world_size
    from .stages import staged_search

    inputs = search_inputs(args)
    if world_size() > 1:
        return _launched(inputs)
    registry = GraftRegistry(inputs.registry_root)
    _, report = staged_search(
        inputs.base, inputs.data, inputs.gates, inputs.config, registry, inputs.out, plot=inputs.plot
    )
    return summary(inputs, report)


def _launched(inputs: SearchInputs) -> dict[str, Any]:
    from ..registry import GraftRegistry
    from .channel import DistributedSettings, launch_store
    from .distributed import distributed_search

    settings = DistributedSettings.from_dict(inputs.distributed)
    store, rank, world = launch_store()
    coordinator = rank == 0
    _, report = distributed_search(
        inputs.base,
        inputs.data,
        inputs.gates,
        inputs.config,
        store=store,
        rank=rank,
        world=world,
        settings=settings,
        registry=GraftRegistry(inputs.registry_root) if coordinator else None,
        out_dir=inputs.out if coordinator else None,
        plot=inputs.plot,
    )
    return summary(inputs, report) if report is not None else {"rank": rank, "world": world, "role": "worker"}


def summary(inputs: SearchInputs, report: Any) -> dict[str, Any]:
    return {
        "out": str(inputs.out),
        "registry": str(inputs.registry_root),
        "stages": len(report.stages),
        "accepted": report.accepted_ids,
        "spent": report.spent,
        "stop_reason": report.stop_reason,
    }
