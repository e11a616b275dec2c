"""`GraftConfig`: what a graft ΔW = s·A·Φ·B looks like and where it goes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection
from dataclasses import InitVar, dataclass, field
from typing import Literal, Union

from peft.config import PeftConfig
from peft.utils.other import get_pattern_key

from ...errors import GraftConfigError
from .peft_type import GRAFT_PEFT_TYPE
from .phi import PHI_FAMILIES


PROJECTIONS = ("svd", "orthogonal", "activation", "gradient", "trainable")
MODES = ("additive", "output")
NAMED_INITS = ("zeros", "lstsq", "gradient_diag")


@dataclass
class GraftConfig(PeftConfig):
    """
    Configuration of a graft adapter (see `GraftModel`).

    A graft adds ``ΔW = s · A Φ B`` to a frozen linear map ``W``: ``B`` (r×in) projects the input into an r-dim graft
    space, ``Φ`` (r×r) is the small trainable operator, ``A`` (out×r) projects back. Only Φ trains unless
    ``projection="trainable"``, so an adapter costs r² numbers per module instead of LoRA's r·(in+out).

    Args:
        r (`int`): Dimension of the graft space. Trainable numbers per module grow with r² (dense Φ): the default
            64 trains 4,096 numbers per module, less than LoRA r=8 on any layer wider than 256. A target narrower than r gets the largest graft it can
            hold (``min(in, out)``, with a warning), recorded in ``rank_pattern``.
        rank_pattern (`dict[str, int]`): Per-module r, keyed by module name or regex (as PEFT LoRA's
            ``rank_pattern``), e.g. ``{"down_proj": 4}``. An entry larger than its module allows is an error.
        target_modules (`Union[list[str], str]`): Module names (suffix match) or a regex to graft. ``"all-linear"``
            targets every linear layer but the output head. Defaults to PEFT's LoRA choice for known model types.
        exclude_modules (`Union[list[str], str]`): Names or a regex of modules never to graft.
        phi (`str`): Structure of Φ. ``"dense"`` (r² params), ``"diagonal"`` (r: scales singular directions, SVFT
            "plain"), ``"triangular"`` (r(r+1)/2), ``"banded"`` (bandwidth ``phi_bandwidth``), ``"lowrank"``
            (Φ = P Qᵀ, 2·r·``phi_rank``), ``"hadamard"`` (Φ = (P Qᵀ) ⊙ (R Sᵀ), 4·r·``phi_rank``, rank up to
            ``phi_rank``²).
        phi_rank (`int`): Inner rank k of the ``lowrank`` and ``hadamard`` families.
        phi_bandwidth (`int`): Number of off-diagonals on each side kept by the ``banded`` family.
        projection (`str`): Where A and B come from. ``"orthogonal"`` (the default): seeded random orthonormal
            matrices regenerated on load, so the artifact stores only Φ (on SmolLM2 it learned as much as ``"svd"``
            at r=32, at a 30th of the file size); ``"svd"``: top-r singular vectors of W (principal subspace, LoRA-XS
            style, stored in the artifact); ``"activation"`` / ``"gradient"``: top-r directions of calibration activations / of the
            calibration weight gradient (needs `calibrate()`); ``"trainable"``: A and B train too (cap them with
            ``max_trainable_params``).
        projection_niter (`Optional[int]`): Iterations of the randomized block Krylov solver that finds the top-r
            subspaces of ``"svd"``, ``"activation"`` and ``"gradient"`` projections (each costs two passes over the
            weight or gradient, one over a Gram matrix). The default 6 (with ``projection_oversample=16``) captures at
            least 99.9% of the exact top-r energy (``‖Aᵀ W Bᵀ‖²_F / Σ_{i≤r} σᵢ²``, see `captured_energy`) on every
            attention and MLP projection of SmolLM2-135M at r = 8, 16 and 32, at a few percent of a full SVD's time
            on large modules (benchmarks/results/projection_accuracy.md, graft_init.md). Lower it for faster, less
            exact subspaces; ``None`` runs the exact full SVD / eigh (minutes per module on 8192-wide layers). Modules
            too small for the Krylov space get the exact one anyway. Loading never runs either: the projections come
            from the file.
        projection_oversample (`int`): Extra columns of the random starting block beyond r (block size
            r + oversample). More columns cost more per iteration and help when singular values cluster around the
            r-th one; a block of 32 columns costs little more time than one of 16 (matrix products run more
            efficiently on wider blocks), so the default 16 buys accuracy that further iterations would cost more.
        mode (`str`): ``"additive"``: y = Wx + s·AΦBx. ``"output"``: y = Wx + s·AΦB(Wx), i.e. W' = (I + s·AΦB)W, a
            correction that lives in W's output space. Both merge exactly into W.
        scaling (`Optional[float]`): The factor s. With orthonormal A, B, ‖ΔW‖₂ = s·‖Φ‖₂. ``None`` (the default)
            picks it per module as ``2.5·sqrt(d·out)/r^1.5`` (d: the graft's input size), so that the learning rate
            you would give LoRA also suits the graft: under Adam each Φ entry moves about lr per step whatever s
            is, so s alone sets how far ΔW moves, and a fixed s = 1 needs learning rates 10–100× LoRA's. The rule
            was calibrated on SmolLM2 (see the README's Usage section). A number is used as given, for every module
            (adapters saved before 0.2 store 1.0 and keep it).
        init_weights (`bool | str`): ``True``/``"zeros"``: the graft starts as the identity (ΔW = 0). ``False``: a
            random non-zero Φ (for tests, as in PEFT's suites). ``"lstsq"``: the Φ that best reproduces one
            gradient step of size ``init_lr`` on calibration data. ``"gradient_diag"``: the diagonal of that Φ.
        init_lr (`float`): Step size of the emulated gradient step used by the ``lstsq`` / ``gradient_diag`` inits.
        seed (`int`): Seed of the projections (orthogonal ones, and the sketches of the svd/activation/gradient
            solver). They are generated on the CPU from (seed, module name), so they are identical on every machine
            with the same torch build and can be regenerated on load. A random Φ (``init_weights=False``) is drawn
            from torch's global generator instead, as LoRA's random init is: ``torch.manual_seed`` decides it.
        save_projection (`Optional[bool]`): Store A and B in the artifact (PEFT VeRA's name for the same choice).
            ``None`` stores them unless they can be regenerated (``orthogonal``: then the artifact holds only Φ and a
            fingerprint checked on load); data-driven, SVD and trainable projections are always stored because they
            depend on data or on weights that merging changes. Set ``True`` to make an orthogonal adapter loadable
            under a torch build that generates other random numbers. Configs written before 0.2 spell it
            ``save_projections``; that spelling is still read.
        sparse_residual (`int`): Number k of individual ΔW entries per module that train on top of A Φ B, chosen by
            gradient magnitude on calibration data (needs `calibrate()`). 0 disables it.
        max_trainable_params (`Optional[int]`): Hard cap on the adapter's trainable numbers over all modules; adding
            the adapter fails (naming the excess) before the model is touched.
        fan_in_fan_out (`bool`): True if targets store weights as (in, out), e.g. GPT-2's `Conv1D`; set
            automatically for `Conv1D`.
        bias (`str`): ``"none"``, ``"all"`` or ``"graft_only"``: which biases train too.
        modules_to_save (`list[str]`): Extra modules trained in full and saved (e.g. a classifier head).
        trainable_token_indices (`Union[list[int], dict[str, list[int]]]`): Embedding rows that train with the
            grafts, e.g. new special tokens, without training the whole embedding (PEFT's trainable tokens, as in
            `LoraConfig`): a list of token ids for the input embedding, or ``{module name: token ids}``. Only these
            rows are saved; a tied output embedding follows the input one.
        ensure_weight_tying (`bool`): On a model with tied input and output embeddings, keep them tied when the
            embedding is in ``modules_to_save`` (one trained copy serves both) or in ``trainable_token_indices`` (the
            same rows train in both), as `LoraConfig` does; trainable token indices that differ between the two then
            raise an error instead of being trained apart.
        modules_to_tie (`set[str]`): Filled in when the adapter is added with ``ensure_weight_tying``: the layers
            tied to the embedding's trained copy (saved with it, so a load knows their tensors belong to the adapter).
        target_parameters (`list[str]`): Parameters to graft directly, as LoRA's field of this name: a 2-D weight that
            a module uses in its own forward, or the stacked expert matrices of transformers' MoE layers (e.g.
            ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`` on Mixtral, names matched by suffix). A stack
            of E experts gets one graft per expert (E Φs); additive mode and projections without calibration only.
            Set ``target_modules=[]`` to graft parameters alone.
        layer_replication (`list[list[int]]`): Grow the model's depth before grafting, as LoRA's field of this name
            does: ``[[0, 4], [2, 5]]`` turns layers 0-4 into 0, 1, 2, 3, 2, 3, 4. The copies share the base weights
            (no extra memory but activations) and each gets grafts of its own; a load replicates the base the same
            way. Merging is refused (it would change every copy of a shared weight).
        layers_to_transform (`Union[list[int], int]`): Only graft these layer indices.
        layers_pattern (`Union[list[str], str]`): Name of the layer list, used with ``layers_to_transform``.
    """

    r: int = field(default=64, metadata={"help": "Graft space dimension."})
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-module r by module name or regex, e.g. {'down_proj': 4}."}
    )
    target_modules: Union[list[str], str] | None = field(
        default=None, metadata={"help": "Module names or regex to graft; 'all-linear' for every linear layer."}
    )
    exclude_modules: Union[list[str], str] | None = field(
        default=None, metadata={"help": "Module names or regex to leave alone."}
    )
    phi: Literal["dense", "diagonal", "triangular", "banded", "lowrank", "hadamard"] = field(
        default="dense", metadata={"help": f"Φ family, one of {tuple(PHI_FAMILIES)}."}
    )
    phi_rank: int = field(default=4, metadata={"help": "Inner rank of the lowrank/hadamard Φ families."})
    phi_bandwidth: int = field(default=2, metadata={"help": "Off-diagonals per side kept by the banded Φ."})
    projection: Literal["svd", "orthogonal", "activation", "gradient", "trainable"] = field(
        default="orthogonal", metadata={"help": f"Source of A and B, one of {PROJECTIONS}."}
    )
    mode: Literal["additive", "output"] = field(default="additive", metadata={"help": f"One of {MODES}."})
    projection_niter: int | None = field(
        default=6, metadata={"help": "Randomized top-r solver iterations for svd/activation/gradient; None: exact."}
    )
    projection_oversample: int = field(
        default=16, metadata={"help": "Extra columns of the randomized solver's starting block beyond r."}
    )
    scaling: float | None = field(
        default=None, metadata={"help": "Scale s of ΔW = s·AΦB; None: 2.5·sqrt(d·out)/r^1.5 per module."}
    )
    init_weights: Union[bool, str] = field(
        default=True, metadata={"help": f"True (identity), False (random), or one of {NAMED_INITS}."}
    )
    init_lr: float = field(default=1e-3, metadata={"help": "Step size emulated by the lstsq/gradient_diag inits."})
    seed: int = field(default=0, metadata={"help": "Seed of the projections (a random Φ follows torch.manual_seed)."})
    save_projection: bool | None = field(
        default=None, metadata={"help": "Store A/B in the artifact (None: unless regenerable)."}
    )
    sparse_residual: int = field(default=0, metadata={"help": "Trainable individual ΔW entries per module."})
    max_trainable_params: int | None = field(default=None, metadata={"help": "Cap on trainable numbers."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Targets store weights as (in, out)."})
    bias: str = field(default="none", metadata={"help": "'none', 'all' or 'graft_only'."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra fully trained modules."})
    trainable_token_indices: Union[list[int], dict[str, list[int]]] | None = field(
        default=None, metadata={"help": "Embedding rows trained alongside the grafts, as in LoRA."}
    )
    ensure_weight_tying: bool = field(
        default=False, metadata={"help": "Keep a tied lm_head tied to a trained embedding copy, as in LoRA."}
    )
    modules_to_tie: set[str] | None = field(
        default=None, metadata={"help": "Set under ensure_weight_tying: layers that share the embedding's copy."}
    )
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Parameters grafted directly (2-D weights, fused MoE expert stacks), as in LoRA."}
    )
    layer_replication: list[list[int]] | None = field(
        default=None, metadata={"help": "[start, end) layer ranges stacked into a deeper model, as in LoRA."}
    )
    layers_to_transform: Union[list[int], int] | None = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Union[list[str], str] | None = field(default=None, metadata={"help": "Layer list name."})
    # The 0.1 spelling of save_projection, still found in saved adapter_config.json files; never written.
    save_projections: InitVar[bool | None] = None

    def __post_init__(self, save_projections: bool | None) -> None:
        super().__post_init__()
        if save_projections is not None:
            if self.save_projection is not None and self.save_projection != save_projections:
                raise GraftConfigError(
                    f"save_projection={self.save_projection!r} and its old spelling save_projections="
                    f"{save_projections!r} disagree; pass only save_projection."
                )
            warnings.warn(
                "GraftConfig(save_projections=...) is now spelled save_projection (as in PEFT's VeRA); the old name "
                "is still read for adapters saved before peft-graft 0.2. Save the adapter again to update its config.",
                FutureWarning,
                stacklevel=3,
            )
            self.save_projection = save_projections
        self.peft_type = GRAFT_PEFT_TYPE
        if isinstance(self.layer_replication, (list, tuple)):  # JSON gives lists, LoRA's examples tuples
            self.layer_replication = [list(pair) if isinstance(pair, tuple) else pair for pair in self.layer_replication]
        self._validate()  # before the name lists become sets: a list holding a list must fail typed, not unhashable
        for name in ("target_modules", "exclude_modules", "modules_to_tie"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, set(getattr(self, name)))

    def _validate(self) -> None:
        """Check every field's type and range, so a bad value (from code or a damaged adapter_config.json) fails
        here with a `GraftConfigError` instead of deep inside loading or the first forward."""

        def fail(name: str, expected: str, value: object) -> None:
            raise GraftConfigError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}).")

        def choice(name: str, value: object, allowed: Collection[str]) -> None:
            if not isinstance(value, str) or value not in allowed:
                raise GraftConfigError(f"Unknown {name}={value!r}; choose one of {', '.join(map(repr, allowed))}.")

        def integer(name: str, value: object, minimum: int, optional: bool = False) -> None:
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                fail(name, f"an integer >= {minimum}" + (" or None" if optional else ""), value)

        def number(name: str, value: object, positive: bool) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "a finite number", value)
            if positive and value <= 0:
                fail(name, "a number > 0", value)

        def names(name: str, value: object) -> None:
            many = isinstance(value, (set, list, tuple))
            if (
                not (value is None or isinstance(value, str) or many)
                or many
                and not all(isinstance(v, str) for v in value)
            ):
                fail(name, "a string, a list of strings or None", value)

        choice("phi", self.phi, PHI_FAMILIES)
        choice("projection", self.projection, PROJECTIONS)
        choice("mode", self.mode, MODES)
        choice("bias", self.bias, ("none", "all", "graft_only"))
        if not isinstance(self.init_weights, bool):
            choice("init_weights", self.init_weights, NAMED_INITS)
        for name in ("r", "phi_rank", "phi_bandwidth"):
            integer(name, getattr(self, name), 1)
        if not isinstance(self.rank_pattern, dict) or not all(isinstance(k, str) for k in self.rank_pattern):
            fail("rank_pattern", "a dict from module names to ranks", self.rank_pattern)
        for key, value in self.rank_pattern.items():
            integer(f"rank_pattern[{key!r}]", value, 1)
        integer("sparse_residual", self.sparse_residual, 0)
        integer("projection_niter", self.projection_niter, 0, optional=True)
        integer("projection_oversample", self.projection_oversample, 0)
        integer("max_trainable_params", self.max_trainable_params, 1, optional=True)
        integer("seed", self.seed, 0)
        if self.scaling is not None:
            number("scaling", self.scaling, positive=False)
        number("init_lr", self.init_lr, positive=True)
        for name in ("save_projection", "fan_in_fan_out", "ensure_weight_tying"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "save_projection"):
                fail(name, "True or False" + (" or None" if name == "save_projection" else ""), value)
        names("target_modules", self.target_modules)
        names("exclude_modules", self.exclude_modules)
        names("modules_to_tie", self.modules_to_tie)
        names("target_parameters", self.target_parameters)
        names("layers_pattern", self.layers_pattern)
        saved = self.modules_to_save  # PEFT iterates it: a plain string would match module names letter by letter
        if saved is not None and (not isinstance(saved, (list, tuple, set)) or not all(isinstance(v, str) for v in saved)):
            fail("modules_to_save", "a list of module names or None", saved)
        ranges = self.layer_replication
        if ranges is not None and not (
            isinstance(ranges, list)
            and ranges
            and all(
                isinstance(pair, list)
                and len(pair) == 2
                and all(type(i) is int for i in pair)
                and 0 <= pair[0] < pair[1]
                for pair in ranges
            )
        ):
            fail("layer_replication", "a non-empty list of [start, end) layer ranges with 0 <= start < end", ranges)
        if self.target_parameters:
            if isinstance(self.target_parameters, str):
                fail("target_parameters", "a list of parameter names (as LoRA takes them)", self.target_parameters)
            unsupported = [f"mode={self.mode!r}"] if self.mode != "additive" else []
            unsupported += list(self.calibration_needs)
            if unsupported:
                raise GraftConfigError(
                    f"target_parameters={list(self.target_parameters)!r} with {', '.join(unsupported)}: a graft on a "
                    "bare parameter is additive and needs no calibration (calibration records the inputs of linear "
                    "layers, and an output-mode graft must know which side of the parameter is its input). Use "
                    "mode='additive' with projection='svd', 'orthogonal' or 'trainable', or put those parameters in "
                    "a separate adapter."
                )
        tokens = self.trainable_token_indices
        by_module = tokens if isinstance(tokens, dict) else {"": tokens}
        if tokens is not None and not (
            isinstance(tokens, (list, dict))
            and all(isinstance(name, str) and isinstance(ids, list) and ids for name, ids in by_module.items())
            and all(type(i) is int and i >= 0 for ids in by_module.values() for i in ids)
        ):
            fail("trainable_token_indices", "a non-empty list of token ids, a dict of them by module or None", tokens)
        layers = self.layers_to_transform
        indices = [layers] if isinstance(layers, int) else layers
        if layers is not None and (
            not isinstance(indices, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in indices)
        ):
            fail("layers_to_transform", "a layer index, a list of them or None", layers)
        if self.init_weights in ("lstsq", "gradient_diag") and self.scaling == 0:
            raise GraftConfigError(
                f"init_weights={self.init_weights!r} sets Φ so that s·AΦB reproduces a gradient step, which no Φ does "
                "at scaling=0. Leave scaling unset (the default rule) or give it a non-zero value."
            )
        if self.init_weights == "gradient_diag" and self.phi not in ("dense", "diagonal", "triangular", "banded"):
            raise GraftConfigError(
                f"init_weights='gradient_diag' sets Φ's diagonal directly; phi={self.phi!r} has no free diagonal. "
                "Use phi='diagonal'/'dense'/'triangular'/'banded' or init_weights='lstsq'."
            )
        if self.save_projection is False and self.projection != "orthogonal":
            raise GraftConfigError(
                f"projection={self.projection!r} cannot be regenerated on load (it depends on data or on weights "
                "that merging changes), so save_projection=False would make the artifact unloadable. Leave "
                "save_projection unset, or use projection='orthogonal'."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise GraftConfigError("layers_pattern only has an effect together with layers_to_transform.")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            # PEFT matches a str target against whole module names and ignores the layer filter; LoRA refuses this too
            raise GraftConfigError(
                f"layers_to_transform/layers_pattern cannot be used when target_modules is a str "
                f"({self.target_modules!r}): PEFT matches it against whole module names and would graft every layer. "
                "Give target_modules as a list of names (e.g. ['q_proj', 'v_proj']), or write the layer indices into "
                "the regex."
            )

    def to_dict(self) -> dict:
        """PEFT's dict, with set-valued fields (PEFT turns ``target_modules`` into a set) as sorted lists.

        PEFT writes a set as ``list(set)``, whose order follows Python's per-process string hash seed: the same
        adapter would then get a different ``adapter_config.json``, and a different content-hash graft id, in every
        process. Sorted, the saved config is a function of the config alone.
        """
        return {key: sorted(value) if isinstance(value, set) else value for key, value in super().to_dict().items()}

    def rank_pattern_key(self, module_name: str) -> str | None:
        """The ``rank_pattern`` entry that applies to ``module_name`` (PEFT's matching rule), if any."""
        key = get_pattern_key(self.rank_pattern.keys(), module_name)
        return key if key in self.rank_pattern else None

    def scaling_for(self, r: int, d: int, out: int) -> float:
        """The s of a module whose graft space has size ``r``, input size ``d`` and output size ``out``."""
        return self.scaling if self.scaling is not None else 2.5 * math.sqrt(d * out) / r**1.5

    def r_for(self, module_name: str) -> int:
        """The graft space size of ``module_name``: its ``rank_pattern`` entry, else ``r``."""
        key = self.rank_pattern_key(module_name)
        return self.r if key is None else self.rank_pattern[key]

    @property
    def stores_projections(self) -> bool:
        """Whether A and B go into the saved artifact."""
        return self.projection != "orthogonal" or bool(self.save_projection)

    @property
    def calibration_needs(self) -> dict[str, str]:
        """What `calibrate()` must supply before the adapter can be used: ``{setting: statistic}``.

        The one place that decides it. The statistic is ``"activations"`` (input/output Gram matrices) or
        ``"gradient"`` (the weight gradient of a loss, so calibration batches need labels). Empty: usable at once.
        """
        needs = {}
        if self.projection in ("activation", "gradient"):
            needs[f"projection={self.projection!r}"] = "activations" if self.projection == "activation" else "gradient"
        if self.init_weights in ("lstsq", "gradient_diag"):
            needs[f"init_weights={self.init_weights!r}"] = "gradient"
        if self.sparse_residual:
            needs[f"sparse_residual={self.sparse_residual}"] = "gradient"
        return needs

    @property
    def needs_calibration(self) -> bool:
        """Whether `calibrate()` must run before the adapter can be used."""
        return bool(self.calibration_needs)
