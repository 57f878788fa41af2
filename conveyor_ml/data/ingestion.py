"""Ingestion: a source becomes an immutable span, as a Beam pipeline on the spec's runner.

    chunks of the source ──Reshuffle──► WriteSpanShards (one per chunk, on any worker)
        each: read the chunk block by block, split every example by a hash of its content,
              encode (image_raw uint8 + label), write train/data-CCCCC-of-NNNNN.tfrecord.gz and eval/…,
              and a small summary (counts per split and label)
    then here: summaries ─► span.json; the staging directory is renamed to span-N in one step.

The work is parallel (DirectRunner multi-processing here, Dataflow, Flink or Spark elsewhere: `beam.args`)
and streams: a worker holds one block of examples, the launcher only the chunk list. No shuffle of the
examples themselves (a GroupByKey of the data would hold it all in the DirectRunner's memory): each chunk
writes its own shard of each split, and the Trainer interleaves the shards.

The split is TFX's rule, a hash of the example's content: deterministic, independent of how the work is
divided, and exact duplicates never straddle train and eval.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from conveyor_ml.base.clock import utc_now
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.files import exclusive_lock, fsync_directory, fsync_tree
from conveyor_ml.base.names import IMAGE_RAW_KEY, NUM_CLASSES
from conveyor_ml.base.process_lifetime import remove_orphaned_scratch
from conveyor_ml.data.sources import Source
from conveyor_ml.formats.examples import encode_examples
from conveyor_ml.formats.spans import MANIFEST, check_span_names, occupied_slot, span_dir
from conveyor_ml.formats.tfrecords import TFRecordWriter

SPLITS = ("train", "eval")
SUMMARIES = ".chunks"
SHARD_NAME = "data-{index:05d}-of-{count:05d}.tfrecord.gz"
# A span is written into `.span-N.tmp-PID` beside its final name: a writer killed outright leaves it, and the
# next writer removes it once PID no longer runs.
STAGING_NAME = ".span-{span}.tmp-{pid}"
STAGING_PATTERN = re.compile(r"\.span-\d+\.tmp-(?P<pid>\d+)")
LOCK_FILE = ".conveyor.lock"
_HASH_SEED = 20240601
_FRACTION_BITS = 53


def _hash_weights(pixels: int) -> np.ndarray:
    return np.random.default_rng(_HASH_SEED).integers(1, 2**63, size=pixels, dtype=np.uint64) | np.uint64(1)


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    with np.errstate(over="ignore"):
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


def eval_mask(images: np.ndarray, labels: np.ndarray, eval_fraction: float) -> np.ndarray:
    """Which examples belong to the eval split: a 64-bit hash of pixels and label, as a fraction of 1."""
    flat = images.reshape(len(images), -1)
    weights = _hash_weights(flat.shape[1])
    with np.errstate(over="ignore"):
        content = (flat.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
        content = _mix(content + _mix(labels.astype(np.uint64) + np.uint64(_HASH_SEED)))
    fraction = (content >> np.uint64(64 - _FRACTION_BITS)).astype(np.float64) / float(2**_FRACTION_BITS)
    return fraction < eval_fraction


def _write_span_shards_fn():
    """The DoFn class, built on first use so importing this module does not import Beam."""
    import apache_beam as beam

    class WriteSpanShards(beam.DoFn):
        """One chunk of the source -> one shard per split and a summary file, all under the staging root."""

        def __init__(self, source: Source, staging: str, eval_fraction: float, chunk_count: int):
            self.source, self.staging = source, staging
            self.eval_fraction, self.chunk_count = eval_fraction, chunk_count

        def process(self, chunk):
            yield write_chunk(self.source, chunk, self.staging, self.eval_fraction, self.chunk_count)

    return WriteSpanShards


def _create(path: str) -> BinaryIO:
    """A new file, local or on any file system Beam knows (gs://...), written as given (no compression)."""
    if "://" not in path:
        return open(path, "wb")
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def write_chunk(source: Source, chunk, staging: str, eval_fraction: float, chunk_count: int) -> dict:
    """One chunk of the source -> one shard per split and a summary file under the staging root; returns the
    summary (examples per split and label)."""
    writers: dict[str, TFRecordWriter] = {}
    label_counts = {split: np.zeros(NUM_CLASSES, np.int64) for split in SPLITS}
    try:
        for images, labels in source.read(chunk):
            evaluation = eval_mask(images, labels, eval_fraction)
            for split, rows in (("train", ~evaluation), ("eval", evaluation)):
                if not rows.any():
                    continue
                if split not in writers:
                    name = SHARD_NAME.format(index=chunk.index, count=chunk_count)
                    writers[split] = TFRecordWriter(_create(posixpath.join(staging, split, name)))
                writers[split].write_all(encode_examples(images[rows], labels[rows]))
                label_counts[split] += np.bincount(labels[rows], minlength=NUM_CLASSES)
    finally:
        for writer in writers.values():
            writer.close()
    summary = {**{split: counts.tolist() for split, counts in label_counts.items()},
               "worker": f"{socket.gethostname()}:{os.getpid()}"}
    with _create(posixpath.join(staging, SUMMARIES, f"{chunk.index:05d}.json")) as out:
        out.write(json.dumps(summary).encode())
    return summary


def _user_error(exc: BaseException) -> str | None:
    """The ConveyorError a worker raised, from the exception chain, or from the text a remote worker's
    failure is reported with."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConveyorError):
            return str(current).split(" [while running ")[0]
        current = current.__cause__ or current.__context__
    marker = "ConveyorError: "
    text = str(exc)
    if marker in text:
        return text.rsplit(marker, 1)[1].splitlines()[0].split(" [while running ")[0]
    return None


def write_shards(source: Source, staging: Path, eval_fraction: float, beam_args: tuple[str, ...] | None) -> list[dict]:
    """Writes every chunk's shards into `staging` with the ingestion pipeline on the runner `beam_args` name,
    or chunk after chunk in this process when they are None (small in-memory sets: no pipeline to start).
    Returns each chunk's summary."""
    chunks = source.chunks()
    if not chunks:
        raise ConveyorError(f"data: the {source.kind} source holds no examples")
    for split in (*SPLITS, SUMMARIES):
        (staging / split).mkdir(parents=True, exist_ok=True)
    if beam_args is None:
        for chunk in chunks:
            write_chunk(source, chunk, str(staging), eval_fraction, len(chunks))
    else:
        _run_pipeline(source, chunks, staging, eval_fraction, beam_args)
    return [json.loads(path.read_text()) for path in sorted((staging / SUMMARIES).glob("*.json"))]


def _run_pipeline(source: Source, chunks: list, staging: Path, eval_fraction: float,
                  beam_args: tuple[str, ...]) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    write_shards = _write_span_shards_fn()(source, str(staging), eval_fraction, len(chunks))
    try:
        with beam.Pipeline(options=PipelineOptions(list(beam_args))) as pipeline:
            _ = (pipeline
                 | "Chunks" >> beam.Create(chunks, reshuffle=False)
                 # Spreads the chunks over the workers (a shuffle of descriptions, not of examples).
                 | "Distribute" >> beam.Reshuffle()
                 | "WriteSpanShards" >> beam.ParDo(write_shards))
    except Exception as exc:
        message = _user_error(exc)
        if message:
            raise ConveyorError(message) from None
        raise


def check_data_root(data_root: Path) -> None:
    """Refuses a directory of spans that is not one (a file), or holds a span named in a way readers miss."""
    if os.path.lexists(data_root) and not data_root.is_dir():
        raise ConveyorError(f"data: {data_root} is a file, but spans are written into a directory there; "
                            "move or remove the file, then run the command again")
    check_span_names(data_root)


def make_data_root(data_root: Path) -> None:
    """Creates the directory of spans, or says in one line why it cannot be."""
    check_data_root(data_root)
    try:
        data_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConveyorError(f"data: cannot create the directory of spans {data_root} ({exc.strerror}); "
                            "set `workspace:` in the spec to a directory you can write") from None


def remove_abandoned_staging(data_root: Path) -> list[Path]:
    """Removes the staging directories of writers that died (SIGKILL, OOM, power loss): those whose process no
    longer runs, and those carrying this process's own pid (a dead writer's pid, reused). Only a process
    holding `writing_spans` may call it: no staging directory of this process's is in use then."""
    own = [path for path in data_root.glob(f".span-*.tmp-{os.getpid()}") if STAGING_PATTERN.fullmatch(path.name)]
    for path in own:
        shutil.rmtree(path, ignore_errors=True)
    return own + remove_orphaned_scratch(".span-", data_root, pattern=STAGING_PATTERN)


@contextmanager
def writing_spans(data_root: Path, waiting: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Held while a span is numbered and written, so two writers (two `data add-span`, `data init` and `run`)
    take consecutive numbers instead of racing for one: an flock on `<data_root>/.conveyor.lock`, which the
    kernel drops however its holder dies. `waiting(lock file)` is called once if another process holds it."""
    make_data_root(data_root)
    lock = data_root / LOCK_FILE
    with ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(lock, waiting))
        except OSError as exc:
            raise ConveyorError(f"data: cannot open the lock {lock} ({exc.strerror}); "
                                "set `workspace:` in the spec to a directory you can write") from None
        remove_abandoned_staging(data_root)
        yield


def say_waiting(lock: Path) -> None:
    print(f"conveyor: waiting for {lock}: another conveyor command is writing a span there", file=sys.stderr,
          flush=True)


def ingest_span(source: Source, data_root: Path, span: int, eval_fraction: float, provenance: dict,
                beam_args: tuple[str, ...] | None = None) -> dict:
    """Writes span-N from a source: the shards go into a staging directory beside it (written by the Beam
    pipeline `beam_args` configure, or in this process when None), the manifest follows, then one rename
    publishes it (a reader sees the whole span or none). Refuses to overwrite; leaves nothing behind on
    failure. Returns the manifest. Whoever chooses `span` holds `writing_spans(data_root)` meanwhile."""
    target = span_dir(data_root, span)
    occupied = occupied_slot(data_root, span)
    if occupied:
        raise ConveyorError(occupied)
    make_data_root(data_root)
    staging = data_root / STAGING_NAME.format(span=span, pid=os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    try:
        summaries = write_shards(source, staging, eval_fraction, beam_args)
        label_counts = {split: np.sum([s[split] for s in summaries], axis=0).astype(int).tolist() for split in SPLITS}
        examples = {split: int(sum(label_counts[split])) for split in SPLITS}
        total = sum(examples.values())
        if total < 2:
            raise ConveyorError(f"span {span}: needs at least 2 examples, got {total}")
        empty = [split for split in SPLITS if not examples[split]]
        if empty:
            raise ConveyorError(f"span {span}: none of the {total} examples fell in the {empty[0]} split "
                                f"(data.eval_fraction {eval_fraction}); a span needs more examples")
        shutil.rmtree(staging / SUMMARIES)
        manifest = {
            "span": span,
            "created": utc_now(),
            "examples": examples,
            "image_shape": list(source.image_shape),
            "label_counts": np.add(label_counts["train"], label_counts["eval"]).tolist(),
            "label_counts_by_split": label_counts,
            "shards": {split: len(list((staging / split).iterdir())) for split in SPLITS},
            "workers": len({s["worker"] for s in summaries}),  # processes that wrote shards
            "encoding": {"feature": IMAGE_RAW_KEY, "dtype": "uint8", "layout": "row-major HxW"},
            "ingestion_seconds": round(time.perf_counter() - started, 2),
            **provenance,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # Durable before it becomes visible, and its name durable after: a crash leaves no span, or a whole one.
        fsync_tree(staging)
        fsync_directory(data_root)
        try:
            os.rename(staging, target)
        except OSError as exc:  # something took the name meanwhile (not a writer: they hold writing_spans)
            raise ConveyorError(occupied_slot(data_root, span)
                                or f"data: cannot rename {staging} to {target} ({exc.strerror})") from None
        fsync_directory(data_root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
