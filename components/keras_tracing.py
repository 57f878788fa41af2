"""One fix to how TensorFlow traces Keras code, for every component that trains or measures a Keras model."""
from __future__ import annotations


def keep_autograph_out_of_keras() -> None:
    """AutoGraph leaves the `keras` package alone but not `tf_keras`, the same Keras 2 code under the name
    TF_USE_LEGACY_KERAS loads: it rewrote ~1,000 of Keras's own functions the first time `fit` traced its train
    step (~20 s of a 600-step run on this 2-core machine, against ~5 s of training), and TFMA's Keras metrics
    again in the Evaluator. Keras's code needs no conversion (it is what the `keras` rule skips); a model's own
    layers and signatures are traced as before. Idempotent; call before the first trace."""
    from tensorflow.python.autograph.core import config

    rule = config.DoNotConvert("tf_keras")
    if not any(str(existing) == str(rule) for existing in config.CONVERSION_RULES):
        config.CONVERSION_RULES = (rule, *config.CONVERSION_RULES)
