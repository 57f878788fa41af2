"""What one pipeline run did: each node's outcome and time, as the runner saw it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NodeOutcome:
    node_id: str
    state: str  # complete | cached | skipped | failed
    seconds: float
    error: str = ""


@dataclass
class RunResult:
    run_id: str
    seconds: float
    outcomes: list[NodeOutcome] = field(default_factory=list)

    def failed(self) -> NodeOutcome | None:
        return next((o for o in self.outcomes if o.state == "failed"), None)
