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
import re
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.formats import release_state as releases

TFLITE_DIR = "tflite"  # where the ServingPusher puts the variants: <version>/tflite/<variant>.tflite
TFLITE_MODEL_FILE = "model.tflite"  # TF Serving's name for a version's TFLite model
MANIFEST_FILE = "manifest.json"  # the ServingPusher's list of the variants it pushed beside a version
# A variant's name is a file name's stem (float32, dynamic_range, ...): never a path.
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def pushed_variants(version_dir: Path) -> list[str]:
    """The variants the version's tflite/manifest.json names, in its order ([] without a manifest); a manifest
    that cannot be read is a one-line error naming it."""
    manifest = version_dir / TFLITE_DIR / MANIFEST_FILE
    fix = "restore it from a backup, or release a variant of another version (--from-version)"
    try:
        document = json.loads(manifest.read_text())
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise ConveyorError(f"{manifest}: not UTF-8 text; {fix}") from None
    except OSError as exc:
        raise ConveyorError(f"{manifest}: cannot read it ({exc.strerror}); {fix}") from None
    except RecursionError:
        raise ConveyorError(f"{manifest}: not a variant manifest (nested too deeply); {fix}") from None
    except ValueError as exc:  # JSONDecodeError, or a number Python's JSON reader refuses
        raise ConveyorError(f"{manifest}: not valid JSON ({getattr(exc, 'msg', exc)}); {fix}") from None
    entries = document.get("variants") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("variant"), str)
            and VARIANT_NAME.fullmatch(entry["variant"]) for entry in entries):
        raise ConveyorError(f'{manifest}: not a variant manifest (expected {{"variants": [{{"variant": NAME, '
                            f'...}}, ...]}} with names of letters, digits, "_" and "-"); {fix}')
    return [entry["variant"] for entry in entries]


def check_tflite_model(path: Path) -> None:
    """Refuses a file LiteRT cannot load as a TFLite model (what the server would fail on once it is live)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # only the command that needs it

    try:  # LiteRT verifies the flatbuffer; no delegate, so nothing is printed on the way
        resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        interpreter = Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=resolver)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError, OSError) as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConveyorError(f"{path}: not a TFLite model LiteRT can load ({detail}); restore it from a "
                            "backup, or release another variant (or another version's, with --from-version)"
                            ) from None


def add_variant_canary(release: releases.ModelRelease, variant: str, weight: int,
                       from_version: int | None = None) -> Path:
    """Copies `<from_version>/tflite/<variant>.tflite` (default: the stable version's) into a new version
    directory as model.tflite (atomically) and labels it canary at `weight` percent in `release`, which the
    caller commits. `variant` must be one the version's manifest names, and a model LiteRT loads: nothing
    is written otherwise. Returns the new version directory."""
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
    variants = pushed_variants(on_disk[source_version])
    if variant not in variants:  # a name, never a path: what the manifest lists is all there is
        available = ", ".join(variants) or "none (was the Quantizer in the pipeline?)"
        shown = variant if VARIANT_NAME.fullmatch(variant) else repr(variant)
        raise ConveyorError(f"model {model} version {source_version} has no {shown} variant (pushed "
                            f"variants: {available}); --variant takes one of those names")
    source = on_disk[source_version] / TFLITE_DIR / f"{variant}.tflite"
    if not source.is_file():
        raise ConveyorError(f"{source}: not a file, though {TFLITE_DIR}/{MANIFEST_FILE} names the {variant} "
                            "variant; restore it from a backup, or release another variant")
    check_tflite_model(source)
    version = releases.next_version(release)
    version_dir = releases.write_version_atomically(release.model_dir, version, {TFLITE_MODEL_FILE: source})
    release.labels[releases.CANARY] = version
    release.weights = {releases.STABLE: 100 - weight, releases.CANARY: weight}
    return version_dir
