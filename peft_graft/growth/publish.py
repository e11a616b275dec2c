"""Pushing to the Hub is allowed only for grafts the registry holds as accepted, with a verified artifact."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GraftNotAcceptedError
from ..registry import GraftRegistry, GraftStatus


@dataclass(frozen=True)
class HubTarget:
    """Where accepted grafts are pushed.

    ``base_model`` is the Hub id the model card names as the base (``base_model:`` in its metadata and the loading
    snippet). By default it is the adapter config's ``base_model_name_or_path``, which is a local path when the base
    was loaded from a folder; name the Hub id of that base here so the card tells readers what to load.
    """

    repo_id: str
    endpoint: str | None = None
    token: str | None = None
    private: bool = False
    base_model: str | None = None


def push_accepted(registry: GraftRegistry, graft_id: str, hub: HubTarget) -> str:
    """Upload an accepted graft (adapter files, registry metadata, model card); returns the commit sha."""
    from ..hub import push_graft

    registry.verify()  # the status must be the one the audit chain records, not an edited column
    record = registry.get(graft_id)
    if record.status is not GraftStatus.ACCEPTED:
        raise GraftNotAcceptedError(
            f"Graft {graft_id[:12]} is {record.status.value}, not accepted: only grafts that passed the gates may "
            "be pushed."
        )
    folder = registry.artifact_dir(graft_id, verify=True)
    commit = push_graft(
        folder, hub.repo_id, metadata=record.to_dict(), metrics=record.metrics,
        base_model=hub.base_model or record.config.get("base_model_name_or_path"), endpoint=hub.endpoint, token=hub.token,
        private=hub.private,
    )
    registry.audit.append("pushed", {"graft_id": graft_id, "repo_id": hub.repo_id, "commit": commit})
    return commit
