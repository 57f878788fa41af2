"""Sticky routing: an unversioned request that carries the model's route-key header (traffic.json's
"route_key", e.g. X-User-Id) is served by the version its key hashes to, so one user sees one version for the
whole of a canary analysis; a request without the header is split by weight as before.

Each key hashes (SHA-256, the same in every process and on every replica) to a bucket 0..99. The labels
take consecutive bucket ranges in a fixed order — canary first, stable last — sized by their weights: as a
canary's weight rises from 10 to 25 the keys in buckets 0..9 stay on the canary and 10..24 join them; no key
ever moves back from the canary to stable while the weight only rises.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

from conveyor_ml.base.names import STABLE_LABEL
from conveyor_ml.formats.serving_config import TrafficWeights
from conveyor_ml.serving.servable import Servable
from conveyor_ml.serving.version_manager import ModelVersions

BUCKETS = 100


def bucket(key: str) -> int:
    """The key's bucket, 0..99: the first 8 bytes of its SHA-256 modulo 100 (uniform, process-independent)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") % BUCKETS


def label_order(labels) -> list[str]:
    """The order labels take their bucket ranges in: every label but stable by name, then stable."""
    return sorted(labels, key=lambda label: (label == STABLE_LABEL, label))


def sticky_label(weights: Mapping[str, int], key: str) -> str | None:
    """The label whose bucket range holds the key's bucket; None when no label has weight."""
    positive = [(label, weights[label]) for label in label_order(weights) if weights[label] > 0]
    total = sum(weight for _, weight in positive)
    if not total:
        return None
    # Weights that do not sum to 100 are scaled, as the weighted split treats them.
    point = bucket(key) * total / BUCKETS
    for label, weight in positive:
        if point < weight:
            return label
        point -= weight
    return positive[-1][0]


def route_key(traffic: TrafficWeights, model: str, headers: Mapping[str, str]) -> str | None:
    """The request's route key: the value of the model's route-key header, or None (no header configured,
    or the request lacks it). `headers` must look names up case-insensitively or hold them lower-cased."""
    header = traffic.route_keys.get(model)
    if not header:
        return None
    return headers.get(header) or headers.get(header.lower()) or None


def sticky_servable(model: ModelVersions, weights: Mapping[str, int], key: str) -> Servable | None:
    """The servable of the label the key hashes to among the labels whose version is loaded; None when none
    is (the caller falls back to its usual choice)."""
    labels = model.labels()
    available = set(model.available_versions())
    loaded = {label: weight for label, weight in weights.items() if labels.get(label) in available}
    label = sticky_label(loaded, key)
    if label is None:
        return None
    return model.resolve(labels[label])
