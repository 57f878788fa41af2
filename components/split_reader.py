"""Reading an Examples artifact's split as a stream: components never hold a whole split in memory."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tfx.types import artifact_utils

# Examples decoded at a time.
BATCH = 256


def split_files(examples, split: str) -> list[str]:
    """The split's shard files, sorted (empty when the split has none)."""
    split_dir = Path(artifact_utils.get_split_uri([examples], split))
    return sorted(str(p) for p in split_dir.iterdir() if p.is_file()) if split_dir.is_dir() else []


def split_batches(files: list[str], image_shape: tuple[int, int], *, limit: int | None = None,
                  batch: int = BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 pixels [n, H, W] 0..255, int64 labels [n]) batches of the files' examples, decoded by the
    model's own parser, read ahead by tf.data; `limit` stops after that many examples."""
    import tensorflow as tf

    from conveyor_ml.components.trainer.model import parse_examples

    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
    if limit is not None:
        dataset = dataset.take(limit)
    dataset = dataset.batch(batch).map(lambda s: parse_examples(s, image_shape, with_labels=True))
    for images, labels in dataset.prefetch(2):
        yield images.numpy(), labels.numpy()


def sample(files: list[str], image_shape: tuple[int, int], count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` examples of the files (fewer if they hold fewer)."""
    batches = list(split_batches(files, image_shape, limit=count))
    if not batches:
        return np.empty((0, *image_shape), np.float32), np.empty(0, np.int64)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
