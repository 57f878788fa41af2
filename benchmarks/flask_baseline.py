"""The "custom Flask service" users start with: one SavedModel behind a JSON endpoint.

Run by benchmarks/serving.py as the baseline, two ways:
- Werkzeug's development server (threaded): python -m benchmarks.flask_baseline SAVED_MODEL_DIR PORT
- a production WSGI server, as a user comparing honestly would deploy it: gunicorn with one worker per core,
  `gunicorn -w CORES --threads 4 'benchmarks.flask_baseline:create_app("SAVED_MODEL_DIR")'`.
It answers what `conveyor serve` answers for the same request: every output of the signature, TF Serving's
row format ({"predictions": [{"class_ids": …, "probabilities": …, "logits": …}]}).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
from flask import Flask, jsonify, request


def create_app(saved_model_dir: str) -> Flask:
    model = tf.saved_model.load(saved_model_dir)
    predict = model.signatures["serving_default"]
    input_name = next(iter(predict.structured_input_signature[1]))
    app = Flask(__name__)

    @app.post("/predict")
    def handle():
        images = np.asarray(request.get_json()["instances"], dtype=np.float32)
        outputs = {name: value.numpy().tolist() for name, value in predict(**{input_name: tf.constant(images)}).items()}
        rows = len(images)
        return jsonify({"predictions": [{name: value[row] for name, value in outputs.items()} for row in range(rows)]})

    return app


if __name__ == "__main__":
    create_app(sys.argv[1]).run(host="127.0.0.1", port=int(sys.argv[2]), threaded=True)
