"""A quantized canary: one of the Quantizer's pushed TFLite variants released as the `canary` version beside
the float SavedModel that is `stable`, so it takes a share of live traffic and is compared on live accuracy
and latency (`conveyor monitor` shows both versions).

The variant becomes a version of its own in TF Serving's TFLite layout — a version directory holding
`model.tflite` — so the server, the release commands and TF Serving itself see an ordinary version: it is
labelled `canary` with the traffic weight, `conveyor promote` makes it stable, `conveyor rollback` removes
it. `conveyor serve --spec` (or --prefer_tflite_model --tflite_float_io) serves it with the float model's
API: float pixels in (quantized with the variant's input scale and zero point), float probabilities out.

    conveyor canary mnist --variant int8 --weight 10
"""
from __future__ import annotations

import json
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.formats import release_state as releases

TFLITE_DIR = "tflite"  # where the ServingPusher puts the variants: <version>/tflite/<variant>.tflite
TFLITE_MODEL_FILE = "model.tflite"  # TF Serving's name for a version's TFLite model


def pushed_variants(version_dir: Path) -> list[str]:
    manifest = version_dir / TFLITE_DIR / "manifest.json"
    try:
        return [entry["variant"] for entry in json.loads(manifest.read_text())["variants"]]
    except (FileNotFoundError, KeyError, TypeError, json.JSONDecodeError):
        return sorted(path.stem for path in (version_dir / TFLITE_DIR).glob("*.tflite"))


def add_variant_canary(release: releases.ModelRelease, variant: str, weight: int,
                       from_version: int | None = None) -> Path:
    """Copies `<from_version>/tflite/<variant>.tflite` (default: the stable version's) into a new version
    directory as model.tflite (atomically) and labels it canary at `weight` percent in `release`, which the
    caller commits. Returns the new version directory."""
    if not 1 <= weight <= 99:
        raise ConveyorError(f"--weight {weight}: a canary takes 1..99 percent")
    model = release.name
    if releases.STABLE not in release.labels:
        raise ConveyorError(f"model {model} has no stable version under {release.base_path}: push one first "
                            "(make pipeline)")
    if releases.CANARY in release.labels:
        raise ConveyorError(f"model {model} already has a canary (version {release.labels[releases.CANARY]}): "
                            "promote or roll it back first")
    source_version = from_version if from_version is not None else release.labels[releases.STABLE]
    on_disk = releases.versions_on_disk(release.model_dir)
    if source_version not in on_disk:
        raise ConveyorError(f"model {model}: version {source_version} is not on disk "
                            f"(versions: {', '.join(map(str, sorted(on_disk))) or 'none'})")
    source = on_disk[source_version] / TFLITE_DIR / f"{variant}.tflite"
    if not source.is_file():
        available = ", ".join(pushed_variants(on_disk[source_version])) or "none (was the Quantizer in the pipeline?)"
        raise ConveyorError(f"model {model} version {source_version} has no {variant} variant (pushed variants: "
                            f"{available})")
    version = releases.next_version(release)
    version_dir = releases.write_version_atomically(release.model_dir, version, {TFLITE_MODEL_FILE: source})
    release.labels[releases.CANARY] = version
    release.weights = {releases.STABLE: 100 - weight, releases.CANARY: weight}
    return version_dir
