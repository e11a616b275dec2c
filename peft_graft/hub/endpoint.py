"""Point an already-imported `huggingface_hub` at another Hub (a mirror, or the local test server).

Why this exists: `huggingface_hub` reads ``HF_ENDPOINT`` once, at import, into three places. ``hf_hub_download``
builds URLs from ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, and the module-level functions (``file_exists``,
``model_info``...) are bound methods of one ``HfApi`` created at import. ``PeftModel.from_pretrained(base, repo_id)``
goes through both, and its ``file_exists`` call takes no ``endpoint`` argument, so passing ``endpoint=`` to
``from_pretrained`` is not enough: the weights lookup would still go to huggingface.co.

So: set ``HF_ENDPOINT`` before anything imports `huggingface_hub` (the supported way), or, inside a process that
already imported it (a test session, a notebook), wrap the calls in `use_hub_endpoint`. It changes process-wide
state, so do not use it while other threads talk to a different Hub.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from huggingface_hub import constants
from huggingface_hub import hf_api as _hf_api

from ..errors import HubOfflineError


@contextlib.contextmanager
def use_hub_endpoint(endpoint: str) -> Iterator[str]:
    """Within the block, every default-endpoint call of `huggingface_hub` (and so of PEFT) goes to ``endpoint``."""
    endpoint = endpoint.rstrip("/")
    saved = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, _hf_api.api.endpoint)
    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    _hf_api.api.endpoint = endpoint
    try:
        yield endpoint
    finally:
        constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, _hf_api.api.endpoint = saved


def require_online(action: str) -> None:
    """Fail early with our own error instead of the client's, naming the switch to flip."""
    if constants.is_offline_mode():
        raise HubOfflineError(
            f"Cannot {action}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set. Unset it before importing "
            "huggingface_hub, or set huggingface_hub.constants.HF_HUB_OFFLINE = False."
        )
