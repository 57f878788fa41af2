"""Conveyor: declarative TFX pipelines from training to production serving.

The import root of every layer (see the README's Architecture section): base, formats and metadata at the
bottom; data, components (the repository's components/ folder) and serving above them; pipelines (the
repository's pipelines/ folder) and operations above those; the command line on top.
"""
import os

# Keras 3 cannot write the SavedModel TFX 1.16 needs; this must be set before TensorFlow is imported, and
# every entry point imports this package first.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
