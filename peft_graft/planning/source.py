"""Where a plan's model config comes from: a preset name, a local folder or config.json, or a Hub id.

Only ``config.json`` is ever fetched. A Hub lookup must not hang a planning command on a machine without network: it
honours ``HF_HUB_OFFLINE`` (cache only), gives up after ``timeout`` seconds, and every failure becomes one typed error
that says what to give instead.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import transformers

from ..errors import ModelSourceError, PeftGraftError
from ..inspect_base import read_config
from .presets import PRESETS, preset_config


logger = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_TRUE = {"1", "true", "yes", "on"}


def resolve_config(
    source: str | os.PathLike, *, timeout: float = 10.0, endpoint: str | None = None
) -> transformers.PretrainedConfig:
    """The config ``source`` names: a preset (`PRESETS`, any case), a model folder or config.json, else an
    ``org/name`` on the Hub (``endpoint``: another Hub URL)."""
    text = os.fspath(source)
    if text.lower() in PRESETS:
        return preset_config(text)
    if Path(text).exists():
        try:
            return read_config(text)
        except PeftGraftError as err:
            raise ModelSourceError(str(err)) from err
    if not _HUB_ID.match(text):
        raise ModelSourceError(
            f"{text!r} is not a preset ({', '.join(PRESETS)}), an existing folder or config.json, or a Hub id of the "
            "form org/name."
        )
    return read_config(_hub_config(text, timeout, endpoint))


def _hub_config(repo_id: str, timeout: float, endpoint: str | None) -> str:
    from huggingface_hub import constants, hf_hub_download

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
    logger.info("fetching config.json of %s from the Hub%s", repo_id, " cache (offline)" if offline else "")
    try:
        return hf_hub_download(
            repo_id, "config.json", etag_timeout=timeout, endpoint=endpoint, local_files_only=offline
        )
    except Exception as err:  # network, auth, missing repo, offline cache miss: all mean "no config from the Hub"
        where = "in the local Hub cache (HF_HUB_OFFLINE is set)" if offline else f"on the Hub within {timeout:g} s"
        raise ModelSourceError(
            f"Cannot get config.json of {repo_id!r} {where}: {type(err).__name__}: {str(err).rstrip('.')}. Download the model's "
            "config.json and give its path, or use a preset."
        ) from err
