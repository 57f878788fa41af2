"""Model versions that misbehave on purpose, for the progressive-delivery tests, made from a pipeline's export:

- `disagreeing`: the export's answers with the classes shifted by one (probabilities rolled: it disagrees
  with the export on every input, with the same confidence), and every call held for `--delay-ms` inside
  the graph (tf.data's sleep: it waits without using a CPU), so a shadow of it is slow but not busy;
- `failing`: the export's answers, except that a request holding an image whose mean pixel is at least
  `--fail-above` fails with INVALID_ARGUMENT (an assertion in the graph), as a buggy preprocessing would.

Both keep the export's `serving_default` signature (float images [N, H, W] in; logits, probabilities and
class_ids out), so the server serves them like any version. Run in a child process:

    python -m tests.progressive_models EXPORT OUT_DIR --delay-ms 100 --fail-above 5.0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _outputs(tf, logits):
    return {"logits": logits, "probabilities": tf.nn.softmax(logits), "class_ids": tf.argmax(logits, axis=1)}


def write_models(export: Path, out_dir: Path, delay_ms: int, fail_above: float) -> None:
    import tensorflow as tf

    # tf.data's sleep transformation (the SleepDataset op, in every TensorFlow runtime) has no public name.
    from tensorflow.python.data.experimental.ops.testing import sleep

    source = tf.saved_model.load(str(export))
    spec = source.signatures["serving_default"].structured_input_signature[1]["images"]
    images_spec = tf.TensorSpec(spec.shape, tf.float32, name="images")

    class Disagreeing(tf.Module):
        def __init__(self):
            super().__init__()
            self.source = source

        @tf.function(input_signature=[images_spec])
        def serve(self, images):
            held = tf.data.Dataset.from_tensors(images).apply(sleep(delay_ms * 1000)).get_single_element()
            logits = self.source.signatures["serving_default"](images=held)["logits"]
            return _outputs(tf, tf.roll(logits, shift=1, axis=1))

    class Failing(tf.Module):
        def __init__(self):
            super().__init__()
            self.source = source

        @tf.function(input_signature=[images_spec])
        def serve(self, images):
            check = tf.debugging.assert_less(tf.reduce_max(tf.reduce_mean(images, axis=[1, 2])),
                                             tf.constant(fail_above, tf.float32),
                                             message="injected failure: an image this bright breaks this version")
            with tf.control_dependencies([check]):
                logits = self.source.signatures["serving_default"](images=tf.identity(images))["logits"]
            return _outputs(tf, logits)

    for name, module in (("disagreeing", Disagreeing()), ("failing", Failing())):
        tf.saved_model.save(module, str(out_dir / name), signatures={"serving_default": module.serve})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("export", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--delay-ms", type=int, default=100)
    parser.add_argument("--fail-above", type=float, required=True)
    args = parser.parse_args(argv)
    write_models(args.export, args.out_dir, args.delay_ms, args.fail_above)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
