"""Small real SavedModels for server tests: fast to write and load, with signatures of several shapes."""
from __future__ import annotations

from pathlib import Path

import tensorflow as tf


class _Tiny(tf.Module):
    def __init__(self, multiplier: float):
        super().__init__()
        self.multiplier = tf.Variable(multiplier, dtype=tf.float32)
        self.weights = tf.Variable(tf.random.stateless_normal((256, 256), seed=(1, 2)))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def scale(self, x):
        return {"y": x * self.multiplier}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="a"),
                                  tf.TensorSpec([None], tf.float32, name="b")])
    def add(self, a, b):
        return {"sum": a + b, "difference": a - b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def strings(self, text):
        return {"length": tf.strings.length(text), "echo_bytes": text}

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def slow(self, x):
        # Real work so a batch takes tens of milliseconds: enough for queues to fill in tests. The product
        # must reach the output (a graph optimizer prunes `0.0 * ...`), yet too small to change it.
        product = self.weights
        for _ in range(60):
            product = tf.tanh(tf.matmul(product, self.weights))
        return {"y": x * self.multiplier + 1e-30 * tf.reduce_sum(product)}


def write_tiny_model(export_dir: Path, multiplier: float = 2.0) -> Path:
    module = _Tiny(multiplier)
    tf.saved_model.save(module, str(export_dir), signatures={
        "serving_default": module.scale.get_concrete_function(),
        "add": module.add.get_concrete_function(),
        "strings": module.strings.get_concrete_function(),
        "slow": module.slow.get_concrete_function(),
    })
    return export_dir


class _FirstRow(tf.Module):
    """Ops that cannot run on zero rows (they read the first), as some kernels cannot (TensorFlow's oneDNN
    Conv2D on CPUs with AVX-512 VNNI)."""

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def centered(self, x):
        return {"centered": x - x[0], "row_sums": tf.reduce_sum(x - x[0], axis=1)}

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def first(self, x):
        return {"first": x[0]}


def write_first_row_model(export_dir: Path) -> Path:
    """serving_default: batch-major outputs ([-1, 3] and [-1]); "first": an output of fixed shape [3]."""
    module = _FirstRow()
    tf.saved_model.save(module, str(export_dir), signatures={
        "serving_default": module.centered.get_concrete_function(),
        "first": module.first.get_concrete_function(),
    })
    return export_dir
