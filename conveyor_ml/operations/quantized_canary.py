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


class DamagedManifest(ConveyorError):
    """tflite/manifest.json cannot be read as {"variants": [{"variant": NAME, "file": FILE, ...}, ...]}; the
    message names the file and what is wrong, and each caller adds its own fix."""


def read_manifest(manifest: Path) -> list[tuple[str, str | None]]:
    """(variant, file or None) of each entry of a version's tflite/manifest.json, in its order.
    FileNotFoundError without one; DamagedManifest for anything that is not of that form (a variant's name
    is a file name's stem, never a path)."""
    def damaged(why: str) -> DamagedManifest:
        return DamagedManifest(f"{manifest}: {why}")

    try:
        document = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise damaged("is a directory, not the variants' JSON file") from None
    except OSError as exc:
        raise damaged(f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise damaged("is not UTF-8 text (damaged)") from None
    except RecursionError:
        raise damaged("nests too deeply to be a variants manifest") from None
    except json.JSONDecodeError as exc:
        raise damaged(f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # a number Python's JSON reader refuses (an integer of over 4,300 digits)
        raise damaged(f"is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    variants = document.get("variants", []) if isinstance(document, dict) else None
    if not isinstance(variants, list):
        raise damaged('is not {"variants": [...]}: ' + (f'"variants" is {type(variants).__name__}'
                                                        if isinstance(document, dict)
                                                        else f"the document is {type(document).__name__}"))
    found = []
    for index, entry in enumerate(variants):
        name = entry.get("variant") if isinstance(entry, dict) else None
        file = entry.get("file") if isinstance(entry, dict) else None
        if not (isinstance(name, str) and VARIANT_NAME.fullmatch(name)) \
                or not (file is None or isinstance(file, str) and file):
            raise damaged(f'entry {index} is not {{"variant": NAME, "file": FILE, ...}} (a NAME of letters, '
                          'digits, "_" and "-")')
        found.append((name, file))
    return found


def pushed_variants(version_dir: Path) -> list[str]:
    """The variants the version's tflite/manifest.json names, in its order ([] without a manifest); a manifest
    that cannot be read is a one-line error naming it."""
    try:
        return [name for name, _ in read_manifest(version_dir / TFLITE_DIR / MANIFEST_FILE)]
    except FileNotFoundError:
        return []
    except DamagedManifest as exc:
        raise ConveyorError(f"{exc}; restore it from a backup, or release a variant of another version "
                            "(--from-version)") from None


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
