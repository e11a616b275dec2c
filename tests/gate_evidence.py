"""What the gates record for an accepted graft, for tests that register one without running a growth loop."""

from __future__ import annotations

from typing import Any

from peft_graft.gates import GateReport, GateResult
from peft_graft.status import GraftStatus


def accepting_evidence(gain: float = 0.05) -> dict[str, Any]:
    """Evidence as GraftGateCallback records it for an accepted graft: the gates' report (all gates passed)."""
    result = GateResult("min_gain", GraftStatus.ACCEPT, "gain above threshold", {"threshold": 0.0}, {"gain": gain})
    return {"report": GateReport("candidate", GraftStatus.ACCEPT, (result,)).to_dict(), "reason": "all gates passed"}
