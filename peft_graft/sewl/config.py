"""`SEWLConfig`: how a graft keeps learning at run time (merge rule, step sizes, which grafts adapt, rails)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import SEWLConfigError


RULES = ("ema", "lowrank", "trust_region", "fisher", "kfac")
TRUST_METRICS = ("euclidean", "fisher")


@dataclass(frozen=True)
class SEWLConfig:
    """
    Configuration of a self-evolving weight layer (see `SEWL`).

    Every update computes g = ∂L/∂Φ (r×r) of the mean per-token loss of one chunk for each selected graft and folds it
    into Φ with ``rule``; the rails then bound what the update may do. The mean per token is fixed on purpose: a
    chunk twice as long gives the same step size, so ``lr`` does not depend on chunk length.

    Args:
        rule (`str`): The merge rule. ``"ema"``: Φ ← Φ₀ + β(Φ − Φ₀) − η g (decay β toward the anchor Φ₀ and step η
            are separate). ``"lowrank"``: the same step without decay, then Φ − Φ₀ is cut to its best rank-``rank``
            approximation (an r×r state that stays cheap to compare and store). ``"trust_region"``: Φ ← Φ − η g,
            then Φ − Φ₀ is projected back onto the ball of radius ``trust_radius`` (Frobenius or Fisher metric).
            ``"fisher"``: online EWC: a diagonal Fisher F (per-token gradients, F ← γF + F_new) pulls Φ toward the
            consolidated Φ* with strength ``ewc_lambda``; two sessions merge as (F₁Φ₁ + F₂Φ₂)/(F₁ + F₂).
            ``"kfac"``: natural gradient with r×r Kronecker factors of projected inputs and projected output gradients
            (running averages, damped, eigendecomposed).
        lr (`float`): Step size η on g. g is the gradient of the mean per-token loss with respect to Φ, so it
            includes the graft scaling s: the same lr moves ΔW = s·AΦB by s²·η·(...).
        decay (`float`): ``ema``'s β per update, in (0, 1]; 1 keeps everything learnt.
        rank (`int`): ``lowrank``'s k.
        trust_radius (`float`): ``trust_region``'s ρ on ‖Φ − Φ₀‖ (Frobenius), or on sqrt(Σ F·(Φ − Φ₀)²) with the
            Fisher metric (≈ sqrt(2·KL), in nats).
        trust_metric (`str`): ``"euclidean"`` or ``"fisher"``.
        fisher_decay (`float`): γ of the running diagonal Fisher (``fisher`` and the Fisher trust metric).
        ewc_lambda (`float`): Strength of the pull toward Φ*; applied implicitly (a proximal step), so any value is
            stable.
        kfac_decay (`float`): Decay of the running Kronecker factors (bias-corrected as in Adam).
        kfac_damping (`float`): Damping of each factor, relative to the mean of its eigenvalues.
        layers (`list[int]`): Only grafts in these layer indices adapt (the first integer in the module name).
        last_k (`int`): Only grafts in the last k layer indices adapt. Autograd starts at the lowest adapting graft,
            so an update on the last layers costs little more than a forward.
        spectral_clip (`float`): τ of the rail ‖ΔW‖₂ ≤ τ on every selected graft after every update (None: off).
            With ``spectral_clip_relative`` (the default) τ is a fraction of the base weight's ‖W‖₂ (additive grafts;
            a block Krylov estimate from below, not a full SVD per module)
            or the bound on ‖s·AΦB‖₂ itself (output-mode grafts, whose ΔW = s·AΦB·W), so one number suits every layer.
        spectral_clip_relative (`bool`): See ``spectral_clip``.
        max_step_fraction (`float`): Shorten (same direction) a graft's step whose own ‖s·A ΔΦ B‖₂ exceeds this
            fraction of τ to that length: one chunk should never be able to spend the whole budget, and the state then
            accumulates several chunks instead of being replaced by the last one (None: off).
        outlier_z (`float`): Skip chunks whose loss is more than this many standard deviations from the running mean
            of accepted chunks (both sides: garbage text and verbatim repeats), after ``outlier_warmup`` chunks.
        outlier_warmup (`int`): Accepted chunks before the outlier rail starts judging.
        canary_every (`int`): Score the canary set every this many applied updates and roll back to the last good
            state when its loss exceeds the starting canary loss by more than ``canary_tolerance`` nats (only when
            `SEWL` is given canary texts).
        canary_tolerance (`float`): Allowed rise of the canary loss, in nats per token.
        age_tokens (`float`): Ageing time constant τ_a in tokens: before each update Φ ← Φ₀ + e^{−n/τ_a}(Φ − Φ₀), n
            the chunk's tokens (None: off). Old knowledge fades with text read, not with wall-clock time.
        chunk_tokens (`int`): Chunk length `SEWL.observe` splits text into.
        log_size (`int`): Update records kept in memory (every record is also sent to `logging`).
    """

    rule: Literal["ema", "lowrank", "trust_region", "fisher", "kfac"] = "ema"
    lr: float = 1e-3
    decay: float = 1.0
    rank: int = 4
    trust_radius: float = 1.0
    trust_metric: Literal["euclidean", "fisher"] = "euclidean"
    fisher_decay: float = 0.99
    ewc_lambda: float = 1.0
    kfac_decay: float = 0.95
    kfac_damping: float = 0.1
    layers: tuple[int, ...] | None = None
    last_k: int | None = None
    spectral_clip: float | None = 0.25
    spectral_clip_relative: bool = True
    max_step_fraction: float | None = 1.0
    outlier_z: float | None = 4.0
    outlier_warmup: int = 8
    canary_every: int = 10
    canary_tolerance: float = 0.05
    age_tokens: float | None = None
    chunk_tokens: int = 256
    log_size: int = 10_000

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, expected: str) -> None:
            value = getattr(self, name)
            raise SEWLConfigError(f"SEWLConfig.{name} must be {expected}, got {value!r} ({type(value).__name__}).")

        def number(name: str, low: float, high: float = math.inf, low_open: bool = True, optional: bool = False):
            value = getattr(self, name)
            if value is None and optional:
                return
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and value <= high
            if not ok:
                bound = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
                fail(name, f"a finite number {bound}" + (" or None" if optional else ""))

        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(name, f"an integer >= {low}" + (" or None" if optional else ""))

        if self.rule not in RULES:
            raise SEWLConfigError(
                f"Unknown SEWLConfig.rule={self.rule!r}; choose one of {', '.join(map(repr, RULES))}."
            )
        if self.trust_metric not in TRUST_METRICS:
            raise SEWLConfigError(
                f"Unknown SEWLConfig.trust_metric={self.trust_metric!r}; choose one of {', '.join(map(repr, TRUST_METRICS))}."
            )
        number("lr", 0.0, low_open=False)
        number("decay", 0.0, 1.0)
        integer("rank", 1)
        number("trust_radius", 0.0)
        number("fisher_decay", 0.0, 1.0, low_open=False)
        number("ewc_lambda", 0.0, low_open=False)
        number("kfac_decay", 0.0, 1.0, low_open=False)
        if self.kfac_decay == 1.0:
            fail("kfac_decay", "a number >= 0 and < 1 (1 would never take in a statistic)")
        number("kfac_damping", 0.0)
        if self.layers is not None and (
            not isinstance(self.layers, tuple)
            or not self.layers
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers)
        ):
            fail("layers", "a non-empty list of layer indices >= 0 or None")
        integer("last_k", 1, optional=True)
        if self.layers is not None and self.last_k is not None:
            raise SEWLConfigError("Give SEWLConfig.layers or SEWLConfig.last_k, not both: they select the same thing.")
        number("spectral_clip", 0.0, optional=True)
        number("max_step_fraction", 0.0, optional=True)
        number("outlier_z", 0.0, optional=True)
        integer("outlier_warmup", 2)
        integer("canary_every", 1)
        number("canary_tolerance", 0.0, low_open=False)
        number("age_tokens", 0.0, optional=True)
        integer("chunk_tokens", 2)
        integer("log_size", 1)
        if not isinstance(self.spectral_clip_relative, bool):
            fail("spectral_clip_relative", "True or False")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (what a snapshot records)."""
        values = dataclasses.asdict(self)
        values["layers"] = None if self.layers is None else list(self.layers)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SEWLConfig:
        """The config a snapshot recorded; unknown or bad fields raise `SEWLConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SEWLConfigError(
                f"The SEWL config has fields this peft-graft does not know: {unknown}. It was written by a newer "
                "version; upgrade peft-graft to read it."
            )
        return cls(**values)
