"""Which servable a version directory becomes: TF Serving's rule for --prefer_tflite_model."""
from __future__ import annotations

from pathlib import Path

from conveyor_ml.serving.servable import TFLITE_MODEL_FILE, LoadOptions, SavedModelServable, Servable
from conveyor_ml.serving.tflite_servable import TfliteServable


def load_servable(model_name: str, version: int, export_dir: Path, options: LoadOptions | None = None) -> Servable:
    """TFLite when --prefer_tflite_model finds model.tflite in the version directory, else the SavedModel
    (TF Serving's fallback); a directory with only model.tflite needs the flag, as in TF Serving."""
    options = options or LoadOptions()
    export_dir = Path(export_dir)
    tflite_file = export_dir / TFLITE_MODEL_FILE
    if options.prefer_tflite_model and tflite_file.is_file():
        return TfliteServable(model_name, version, export_dir, options)
    if tflite_file.is_file() and not any((export_dir / name).is_file()
                                         for name in ("saved_model.pb", "saved_model.pbtxt")):
        raise ValueError(f"{export_dir} holds {TFLITE_MODEL_FILE} but no SavedModel: serve it with "
                         "--prefer_tflite_model")
    return SavedModelServable(model_name, version, export_dir, options)
