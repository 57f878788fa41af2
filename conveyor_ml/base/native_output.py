"""Silencing what TensorFlow's C++ layers write straight to file descriptor 2.

The TFLite converter and LiteRT print MLIR warnings and delegate banners from C++, which Python's
`sys.stderr` cannot intercept; between our progress lines they read like failures. Errors still reach
the user through the Python exception the converter raises.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

# Lines TensorFlow's CUDA plugins print at import in every process, GPU or not (a known TF 2.16 message).
NATIVE_NOISE = ("Unable to register cuFFT factory", "Unable to register cuDNN factory",
                "Unable to register cuBLAS factory", "All log messages before absl::InitializeLog()")


def is_native_noise(line: str) -> bool:
    return any(marker in line for marker in NATIVE_NOISE)


@contextlib.contextmanager
def native_stderr_discarded() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
