"""Typed errors of the Hub round trip; each message says what went wrong and what to do about it."""

from __future__ import annotations

from ..errors import PeftGraftError


class HubError(PeftGraftError):
    """Base class of every error raised by `peft_graft.hub`."""


class GraftNotAcceptedError(HubError, ValueError):
    """Only grafts the validation gates accepted may be published; nothing was uploaded."""


class GraftMetadataError(HubError, ValueError):
    """The registry record or metrics cannot be published, or a pulled repo has no usable ``graft_metadata.json``."""


class GraftIntegrityError(HubError, ValueError):
    """Bytes on the Hub differ from the sha256 recorded in ``graft_metadata.json`` (or from the local files pushed)."""


class PullDestinationError(HubError, FileExistsError):
    """``local_dir`` holds something other than an earlier pulled graft, so it is not overwritten."""


class HubOfflineError(HubError, ConnectionError):
    """``HF_HUB_OFFLINE`` is set, so the Hub cannot be reached."""
