import os

# Keras 3 cannot write the SavedModel TFX 1.16 needs; this must be set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
