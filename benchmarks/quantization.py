"""The four TFLite variants on a ~1M-parameter 28x28 CNN, where kernel speed rather than interpreter overhead
decides latency. The model is the Trainer's own architecture (bigger filters) trained briefly on the embedded
digits upscaled to 28x28; conversion and measurement are the Quantizer's own functions.

Run: make bench (or .venv/bin/python -m benchmarks.quantization). Writes benchmarks/results/quantization.md.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

from benchmarks.common import spread, write_results


def digits_28x28():
    import numpy as np
    import tensorflow as tf

    from conveyor_ml.data.datasets import embedded_digits

    digits = embedded_digits()
    images = tf.image.resize(digits.images[..., None], (28, 28)).numpy()[..., 0].astype(np.float32)
    return images, digits.labels


def train_model(images, labels, steps: int, export_dir: str) -> int:
    import tensorflow as tf

    from conveyor_ml.base.spec import ModelArchitecture
    from conveyor_ml.components.trainer.model import build_model, serving_signatures

    model = build_model((28, 28), ModelArchitecture(conv_filters=(32, 64, 128), dense_units=768, dropout=0.1))
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(2048, seed=1).repeat().batch(64)
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    model.save(export_dir, save_format="tf", signatures=serving_signatures(model, (28, 28)))
    return model.count_params()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--latency-runs", type=int, default=300)
    args = parser.parse_args(argv)

    from conveyor_ml.components.quantizer import report
    from conveyor_ml.components.quantizer.tflite_variants import (
        VARIANTS,
        convert,
        measure,
        saved_model_accuracy,
    )

    images, labels = digits_28x28()
    train_images, train_labels = images[:1400], labels[:1400]
    eval_images, eval_labels = images[1400:], labels[1400:]
    with tempfile.TemporaryDirectory() as export_dir:
        params = train_model(train_images, train_labels, args.train_steps, export_dir)
        float_accuracy = saved_model_accuracy(export_dir, eval_images, eval_labels)
        rows, runs = [], {}
        for variant in VARIANTS:
            content = convert(export_dir, variant, train_images[:200])
            measured = [measure(content, eval_images, eval_labels, threads=2, latency_runs=args.latency_runs,
                                throughput_batch=64) for _ in range(args.repeats)]
            runs[variant] = {"latency_p50_ms": spread([m.latency_p50_ms for m in measured]),
                             "throughput_per_s": spread([m.throughput_per_s for m in measured])}
            accuracy = measured[0].accuracy
            rows.append({"variant": variant, "status": "ok", "error": "", "size_bytes": len(content),
                         "accuracy": accuracy, "accuracy_delta_points": (accuracy - float_accuracy) * 100,
                         "latency_p50_ms": statistics.median(m.latency_p50_ms for m in measured),
                         "latency_p95_ms": statistics.median(m.latency_p95_ms for m in measured),
                         "throughput_per_s": statistics.median(m.throughput_per_s for m in measured),
                         "blessed": (float_accuracy - accuracy) * 100 <= 1.0})
            print(f"{variant}: {len(content)} bytes, p50 {rows[-1]['latency_p50_ms'] * 1000:.0f} µs", flush=True)
    report.complete_rows(rows)
    spreads = "\n".join(
        f"| {v} | {r['latency_p50_ms']['median'] * 1000:.0f} µs ({r['latency_p50_ms']['min'] * 1000:.0f}–"
        f"{r['latency_p50_ms']['max'] * 1000:.0f}) | {r['throughput_per_s']['median']:,.0f}/s "
        f"({r['throughput_per_s']['min']:,.0f}–{r['throughput_per_s']['max']:,.0f}) |" for v, r in runs.items())
    markdown = (
        "# Quantization benchmark\n\n"
        f"A {params:,}-parameter CNN on 28×28 digits (the embedded digits upscaled; {len(eval_images)} eval "
        f"images), float SavedModel accuracy {float_accuracy:.4f}. LiteRT (ai-edge-litert) with XNNPACK, "
        f"2 threads; latency is batch 1, throughput batch 64; medians of {args.repeats} runs.\n\n"
        + report.markdown(rows) +
        "\n| variant | p50 latency, median (min–max) | throughput, median (min–max) |\n|---|---|---|\n"
        + spreads + "\n")
    write_results("quantization", {"parameters": params, "float_accuracy": float_accuracy, "variants": rows,
                                   "spread": runs}, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
