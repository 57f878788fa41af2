"""A quantized canary: one of the Quantizer's pushed TFLite variants released as the `canary` version beside
the float SavedModel that is `stable`, so it takes a share of live traffic and is compared on live accuracy
and latency (`conveyor monitor` shows both versions).

The variant becomes a version of its own in TF Serving's TFLite layout — a version directory holding
`model.tflite` — so the server, the release commands and TF Serving itself see an ordinary version: it is
labelled `canary` with the traffic weight, `conveyor promote` makes it stable, `conveyor rollback` removes
it. `conveyor serve --spec` (or --prefer_tflite_model --tflite_float_io) serves it with the float model's
API: float pixels in (quantized with the variant's input scale and zero point), float probabilities out.

    .venv/bin/python -m conveyor_ml.operations.quantized_canary mnist int8 --weight 10
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.formats import release_state as releases

TFLITE_DIR = "tflite"  # where the ServingPusher puts the variants: <version>/tflite/<variant>.tflite
TFLITE_MODEL_FILE = "model.tflite"  # TF Serving's name for a version's TFLite model
VARIANT_CANARY = "conveyor.VariantCanary"


def _variants(version_dir: Path) -> list[str]:
    manifest = version_dir / TFLITE_DIR / "manifest.json"
    try:
        return [entry["variant"] for entry in json.loads(manifest.read_text())["variants"]]
    except (FileNotFoundError, KeyError, TypeError, json.JSONDecodeError):
        return sorted(path.stem for path in (version_dir / TFLITE_DIR).glob("*.tflite"))


def release_variant_canary(base_path: Path, model: str, variant: str, weight: int = 10,
                           from_version: int | None = None) -> tuple[releases.ModelRelease, releases.ModelRelease]:
    """Copies `<from_version>/tflite/<variant>.tflite` (default: the stable version's) into a new version
    directory as model.tflite and makes it the canary at `weight` percent. Returns (before, after)."""
    if not 1 <= weight <= 99:
        raise ConveyorError(f"--weight {weight}: a canary takes 1..99 percent")
    release = releases.read_release(base_path, model)
    if releases.STABLE not in release.labels:
        raise ConveyorError(f"model {model} has no stable version under {base_path}: push one first (make pipeline)")
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
        available = ", ".join(_variants(on_disk[source_version])) or "none (was the Quantizer in the pipeline?)"
        raise ConveyorError(f"model {model} version {source_version} has no {variant} variant (pushed variants: "
                            f"{available})")
    before = releases.ModelRelease(release.name, release.base_path, dict(release.labels), dict(release.weights),
                                   list(release.history))
    version = releases.next_version(release)
    releases.write_version_atomically(release.model_dir, version, {TFLITE_MODEL_FILE: source})
    release.labels[releases.CANARY] = version
    release.weights = {releases.STABLE: 100 - weight, releases.CANARY: weight}
    releases.write_release(release)
    return before, release


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conveyor_ml.operations.quantized_canary",
                                     description="release a pushed TFLite variant as the canary version")
    parser.add_argument("model")
    parser.add_argument("variant", help="a variant the Quantizer blessed and the ServingPusher pushed, e.g. int8")
    parser.add_argument("--weight", type=int, default=10, help="percent of unversioned traffic (default 10)")
    parser.add_argument("--from-version", type=int, help="the version whose variant to use (default: stable's)")
    parser.add_argument("--spec", default="pipelines/mnist.yaml")
    parser.add_argument("--reason", default="")
    args = parser.parse_args(argv)
    try:
        from conveyor_ml.base.spec import load_spec
        from conveyor_ml.operations.release_commands import record_change

        spec = load_spec(args.spec)
        if spec.serving_base is None:
            raise ConveyorError(f"{args.spec}: no components.serving_pusher, so there is nothing to release")
        with releases.locked(spec.serving_base):
            before, after = release_variant_canary(spec.serving_base, args.model, args.variant, args.weight,
                                                   args.from_version)
            try:
                record_change(spec, VARIANT_CANARY, before, after,
                              args.reason or f"{args.variant} variant as canary")
            except Exception:
                releases.write_release(before)  # the files and the record stay in step
                shutil.rmtree(after.model_dir / str(after.labels[releases.CANARY]), ignore_errors=True)
                raise
    except ConveyorError as exc:
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2
    canary = after.labels[releases.CANARY]
    print(f"{args.model}: version {canary} = {args.variant} variant of version {before.labels[releases.STABLE]}, "
          f"canary at {args.weight}% (stable {after.labels[releases.STABLE]} at {100 - args.weight}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
