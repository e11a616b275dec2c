"""The compared methods, one folder each under experiments/ (the layout of PEFT's method_comparison):

    experiments/<method>/adapter_config.json    the adapter config as its class saved it (PeftConfig.from_pretrained
                                                reads it once peft_graft is imported), for SmolLM2-135M
    experiments/<method>/training_params.json   label, base ("fp32" or "nf4"), lr_grid, and where needed
                                                calibration_batches or "calibration": "first_step" / "first_steps"
                                                (with calibration_steps and, to solve only on the first and last
                                                of them, "calibration_refine_each_step": false), and
                                                quick_overrides (config fields replaced on the quick mode's tiny
                                                model, e.g. an r fitted to a parameter budget)

Pure JSON: nothing here imports torch or peft, so the report reads the methods without loading a framework.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
# Training options that choose which runs are made or how they are shown, not what a run computes: changing them
# must not invalidate stored runs.
NOT_RUN_IDENTITY = ("label", "lr_grid")


@dataclass(frozen=True)
class Experiment:
    name: str
    folder: Path
    adapter_config: dict
    training: dict

    @classmethod
    def load(cls, name: str, root: Path = EXPERIMENTS_DIR) -> Experiment:
        folder = root / name
        if not folder.is_dir():
            raise SystemExit(f"no experiment {name!r} under {root} (known: {', '.join(experiment_names(root))})")
        return cls(name, folder, json.loads((folder / "adapter_config.json").read_text()),
                   json.loads((folder / "training_params.json").read_text()))

    @property
    def label(self) -> str:
        return self.training["label"]

    @property
    def base(self) -> str:
        return self.training["base"]

    @property
    def lr_grid(self) -> tuple[float, ...]:
        return tuple(self.training["lr_grid"])

    @property
    def probe_lr(self) -> float:
        """A real step size for the probe's training steps (the middle of the grid), so that the merged-vs-unmerged
        logit check compares a non-trivial adapter."""
        return self.lr_grid[len(self.lr_grid) // 2]

    @property
    def calibration_batches(self) -> int | None:
        return self.training.get("calibration_batches")

    @property
    def calibration_steps(self) -> int:
        """How many of the first training steps calibrate the adapter (`peft_graft.CalibratingSteps`) instead of
        calibration_batches extra passes before training: "calibration": "first_step" is 1, "first_steps" reads
        calibration_steps; 0 for the rest."""
        kind = self.training.get("calibration")
        return {"first_step": 1, "first_steps": self.training.get("calibration_steps", 0)}.get(kind, 0)

    @property
    def calibration_refine_each_step(self) -> bool:
        """Whether every calibrating step after the first moves the projections (else only the last one does)."""
        return self.training.get("calibration_refine_each_step", True)

    @property
    def quick_overrides(self) -> dict:
        return self.training.get("quick_overrides", {})

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(self.adapter_config["target_modules"])

    def matches(self, where: dict) -> bool:
        """Whether every key of ``where`` equals this method's adapter-config field or training option."""
        facts = {**self.adapter_config, **self.training}
        return all(facts.get(key) == value for key, value in where.items())

    def identity(self) -> dict:
        """What a run of this method depends on besides the protocol's setup, its seed and its lr."""
        training = {k: v for k, v in self.training.items() if k not in NOT_RUN_IDENTITY}
        return dict(method=self.name, adapter_config=adapter_identity(self.adapter_config), training=training)


SOLVER_PROJECTIONS = ("svd", "activation", "gradient")
SOLVER_FIELDS = ("projection_niter", "projection_oversample")
# GraftConfig fields added after runs were recorded, with the defaults under which they train nothing different:
# left out of a graft run's identity at those defaults, so the recorded runs keep theirs (LoRA had them all along).
LATER_GRAFT_DEFAULTS = {
    "trainable_token_indices": None, "ensure_weight_tying": False, "modules_to_tie": None, "target_parameters": None,
    "layer_replication": None,
}


def adapter_identity(config: dict) -> dict:
    """The adapter-config part of a run's identity.

    The projection-solver fields (added with the fast solver) change what is trained only for projections that
    solver finds, and only when it is not the exact SVD/eigh (``projection_niter=None``) that every run recorded
    before the fields existed used; otherwise they are left out, so those runs keep their identity. A config with
    such a projection must name its solver: leaving it to the package default would let the default change results
    under an unchanged identity.
    """
    if config.get("peft_type") == "GRAFT":
        config = {k: v for k, v in config.items() if k not in LATER_GRAFT_DEFAULTS or v != LATER_GRAFT_DEFAULTS[k]}
    if config.get("projection") in SOLVER_PROJECTIONS:
        if "projection_niter" not in config:
            raise ValueError(
                f"A {config['projection']!r}-projection config must set projection_niter (None: exact SVD/eigh)."
            )
        if config["projection_niter"] is not None:
            return dict(config)
    return {k: v for k, v in config.items() if k not in SOLVER_FIELDS}


def load_experiments(names: list[str] | tuple[str, ...], root: Path = EXPERIMENTS_DIR) -> dict[str, Experiment]:
    return {name: Experiment.load(name, root) for name in names}


def experiment_names(root: Path = EXPERIMENTS_DIR) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").exists())
