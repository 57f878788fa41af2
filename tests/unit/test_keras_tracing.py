"""AutoGraph leaves Keras's own code alone under TF_USE_LEGACY_KERAS (tf_keras), as it does for `keras`,
while a user's own functions are still converted."""
from __future__ import annotations

import subprocess
import sys

# Run in a fresh interpreter: the rule is process-wide, and "before" must see TensorFlow's own rules.
PROBE = """
import tensorflow as tf
from tensorflow.python.autograph.impl import conversion
from tf_keras.src.engine.training import Model

def user_function(x):
    return x + 1

def allowlisted():
    return conversion.is_allowlisted(Model.train_step), conversion.is_allowlisted(user_function)

print("before", *allowlisted())
from conveyor_ml.components.keras_tracing import keep_autograph_out_of_keras
from tensorflow.python.autograph.core import config
keep_autograph_out_of_keras()
rules = len(config.CONVERSION_RULES)
keep_autograph_out_of_keras()
print("after", *allowlisted())
print("idempotent", len(config.CONVERSION_RULES) == rules)
"""


def test_keras_code_is_not_converted_and_user_code_still_is():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          env={"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore",
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["before"] == "False False"  # TensorFlow's rules name `keras`, not `tf_keras`
    assert lines["after"] == "True False"
    assert lines["idempotent"] == "True"
