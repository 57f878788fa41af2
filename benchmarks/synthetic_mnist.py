"""Synthetic MNIST-sized data in MNIST's IDX format, generated deterministically (no download): each image is
one of scikit-learn's embedded 8x8 digits, scaled up to 24x24, placed at a random offset in a 28x28 frame,
with random ink intensity and sparse noise. Learnable like MNIST (the default model reaches ~0.95), and
written block by block, so a million images take a few seconds and little memory.

    python -m benchmarks.synthetic_mnist DIR --train 60000 --test 10000
"""
from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np

SIZE, GLYPH = 28, 24
BLOCK = 20_000


def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    scaled = digits.images / 16.0  # 0..1
    glyphs = np.kron(scaled, np.ones((GLYPH // 8, GLYPH // 8)))  # nearest-neighbour 8x8 -> 24x24
    return glyphs.astype(np.float32), digits.target.astype(np.uint8)


def images_and_labels(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` synthetic images (uint8 [count, 28, 28]) and labels, the same for the same seed."""
    glyphs, targets = _glyphs()
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(glyphs), count)
    offsets = rng.integers(0, SIZE - GLYPH + 1, (count, 2))
    ink = rng.uniform(0.6, 1.0, count).astype(np.float32)
    images = np.zeros((count, SIZE, SIZE), np.float32)
    for dy in range(SIZE - GLYPH + 1):
        for dx in range(SIZE - GLYPH + 1):
            rows = np.flatnonzero((offsets[:, 0] == dy) & (offsets[:, 1] == dx))
            images[rows, dy:dy + GLYPH, dx:dx + GLYPH] = glyphs[chosen[rows]]
    images *= ink[:, None, None] * 255.0
    noise = rng.random((count, SIZE, SIZE), np.float32) < 0.02
    images[noise] = rng.integers(0, 256, int(noise.sum())).astype(np.float32)
    return np.clip(images, 0, 255).astype(np.uint8), targets[chosen]


def _write_idx(path: Path, shape: tuple[int, ...], blocks) -> None:
    with open(path, "wb") as handle:
        handle.write(struct.pack(">BBBB", 0, 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape))
        for block in blocks:
            handle.write(block.tobytes())


def write_idx_pair(directory: Path, prefix: str, count: int, seed: int) -> None:
    """`<prefix>-images-idx3-ubyte` and `<prefix>-labels-idx1-ubyte`, generated in blocks."""
    directory.mkdir(parents=True, exist_ok=True)
    labels = []
    starts = range(0, count, BLOCK)

    def image_blocks():
        for index, start in enumerate(starts):
            images, block_labels = images_and_labels(min(BLOCK, count - start), seed * 100_003 + index)
            labels.append(block_labels)
            yield images

    _write_idx(directory / f"{prefix}-images-idx3-ubyte", (count, SIZE, SIZE), image_blocks())
    _write_idx(directory / f"{prefix}-labels-idx1-ubyte", (count,), labels)


def write_dataset(directory: Path, train: int, test: int, seed: int = 1) -> Path:
    """A directory with MNIST's four IDX files (train and t10k)."""
    write_idx_pair(directory, "train", train, seed)
    write_idx_pair(directory, "t10k", test, seed + 1)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--train", type=int, default=60_000)
    parser.add_argument("--test", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    write_dataset(args.directory, args.train, args.test, args.seed)
    print(f"wrote {args.train} + {args.test} images to {args.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
