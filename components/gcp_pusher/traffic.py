"""How a Vertex AI endpoint's traffic moves on a push, a promotion and a rollback.

Pure functions over the endpoint's deployed models, so the rules are testable without a network. Roles
follow deployment order: with two or more models deployed, the newest is the canary and the one with
the most traffic among the rest is stable; anything else is left over from earlier pushes.
"""
from __future__ import annotations

from dataclasses import dataclass

from conveyor_ml.base.errors import ConveyorError

NEW = "0"  # Vertex AI's key for "the model this DeployModel request deploys" in a traffic split


@dataclass(frozen=True)
class Deployed:
    id: str
    model: str  # projects/…/models/M
    version: str  # the model version id
    created: float
    traffic: int


@dataclass(frozen=True)
class TrafficChange:
    split: dict[str, int]  # deployed model id (or NEW) -> percent; sums to 100
    undeploy: list[str]  # ids left with no traffic, undeployed after the split moves
    stable: str  # the id (or NEW) that is stable afterwards


def roles(deployed: list[Deployed]) -> tuple[Deployed | None, Deployed | None]:
    """(stable, canary) on an endpoint."""
    if not deployed:
        return None, None
    if len(deployed) == 1:
        return deployed[0], None
    newest = max(deployed, key=lambda d: d.created)
    rest = [d for d in deployed if d is not newest]
    return max(rest, key=lambda d: (d.traffic, d.created)), newest


def for_push(deployed: list[Deployed], canary_weight: int) -> TrafficChange:
    """A new version takes `canary_weight` % beside stable; the first version, or weight 100, takes it all.
    A canary already there is replaced by the new one."""
    stable, _ = roles(deployed)
    if stable is None or canary_weight >= 100:
        return TrafficChange({NEW: 100}, [d.id for d in deployed], NEW)
    split = {NEW: canary_weight, stable.id: 100 - canary_weight} if canary_weight > 0 else {stable.id: 100}
    return TrafficChange(split, [d.id for d in deployed if d is not stable], stable.id)


def for_promotion(deployed: list[Deployed], weight: int | None, endpoint: str) -> TrafficChange:
    """The canary to `weight` % (a step), or to 100 % with the old stable undeployed."""
    stable, canary = roles(deployed)
    if canary is None:
        raise ConveyorError(f"endpoint {endpoint} has no canary to promote (deployed: "
                            f"{', '.join(d.id for d in deployed) or 'nothing'}); push one first")
    if weight is None or weight >= 100:
        return TrafficChange({canary.id: 100}, [d.id for d in deployed if d is not canary], canary.id)
    if not 0 < weight < 100:
        raise ConveyorError(f"--weight must be between 1 and 100, not {weight}")
    return TrafficChange({canary.id: weight, stable.id: 100 - weight}, [], stable.id)


def for_rollback(deployed: list[Deployed], endpoint: str) -> TrafficChange:
    """All traffic back to stable; the canary is undeployed."""
    stable, canary = roles(deployed)
    if canary is None:
        raise ConveyorError(f"endpoint {endpoint} has no canary to roll back (only stable "
                            f"{stable.version if stable else 'nothing'} is deployed); push the version "
                            "to go back to with canary_weight 100")
    return TrafficChange({stable.id: 100}, [d.id for d in deployed if d is not stable], stable.id)


def rows_after(deployed: list[Deployed], change: TrafficChange, new: Deployed | None = None) -> list[dict]:
    """The endpoint's state after a change, one row per model version it concerns (for Deployment artifacts)."""
    def resolved(key: str) -> str:
        return new.id if new and key == NEW else key

    split = {resolved(key): value for key, value in change.split.items()}
    stable_id = resolved(change.stable)
    everything = deployed + ([new] if new else [])
    rows = []
    for item in everything:
        traffic = split.get(item.id, 0)
        if item.id == stable_id:
            state, label = "live", "stable"
        elif item.id in change.undeploy:
            state, label = "retired", ""
        else:
            state, label = "canary", "canary"
        rows.append({"version": item.version, "label": label, "traffic_percent": traffic,
                     "release_state": state, "model_resource": item.model, "deployed_model_id": item.id})
    return rows


def rows_observed(now: list[Deployed], before: list[Deployed]) -> list[dict]:
    """The endpoint's state as read back (after a call failed part of the way, or a process died before
    recording): the model with the most traffic is stable, others with traffic are canaries, deployed ones
    without traffic are idle, and those deployed `before` that are gone are retired."""
    serving = sorted((d for d in now if d.traffic > 0), key=lambda d: (-d.traffic, d.created))
    stable_id = serving[0].id if serving else None
    rows = []
    for item in now:
        if item.id == stable_id:
            state, label = "live", "stable"
        elif item.traffic > 0:
            state, label = "canary", "canary"
        else:
            state, label = "idle", ""
        rows.append({"version": item.version, "label": label, "traffic_percent": item.traffic,
                     "release_state": state, "model_resource": item.model, "deployed_model_id": item.id})
    present = {d.id for d in now}
    rows += [{"version": item.version, "label": "", "traffic_percent": 0, "release_state": "retired",
              "model_resource": item.model, "deployed_model_id": item.id} for item in before if item.id not in present]
    return rows
