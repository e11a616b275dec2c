"""Publishing accepted grafts to a Hugging Face Hub and getting them back, verified.

`push_graft` uploads an accepted graft (adapter files, ``graft_metadata.json``, a model card) in one commit;
`pull_graft` downloads one and checks it against its recorded sha256; ``PeftModel.from_pretrained(base, repo_id)``
loads one directly once ``peft_graft`` is imported. `use_hub_endpoint` points an already-imported `huggingface_hub`
at another Hub, such as the Hub-compatible test server in `peft_graft.testing.hub_server` (not imported here, so that
``python -m peft_graft.testing.hub_server`` runs it cleanly).
"""

from ..errors import (
    GraftIntegrityError,
    GraftMetadataError,
    GraftNotAcceptedError,
    HubError,
    HubOfflineError,
    PullDestinationError,
)
from .endpoint import use_hub_endpoint
from .pull import pull_graft
from .push import push_graft
from .record import GRAFT_METADATA_NAME


__all__ = [
    "GRAFT_METADATA_NAME",
    "GraftIntegrityError",
    "GraftMetadataError",
    "GraftNotAcceptedError",
    "HubError",
    "HubOfflineError",
    "PullDestinationError",
    "pull_graft",
    "push_graft",
    "use_hub_endpoint",
]
