"""Garbage collection for a server whose heap is mostly long-lived model objects.

A loaded TensorFlow model leaves ~350,000 Python objects that live as long as its version. CPython's cyclic
collector walks all of them in every full collection: here one took 0.2 s, holding the GIL, every few
seconds under load (the 200 ms P99 tails of the serving benchmark), and its young collections ran ~700 times
in 10 s. So `conveyor serve`:
- freezes the heap (`gc.freeze`: the collector skips those objects) once the models it serves are loaded,
  and again after every version load or unload (unfreezing and collecting first, so an unloaded model's
  cycles are freed rather than kept frozen): one 0.2-0.4 s pause per version change, taken half a second
  after it (model_server.SETTLE_SECONDS) so the new version's first answers do not wait for it;
- collects the young generation every YOUNG_THRESHOLD net allocations instead of 700: requests leave
  almost no cycles (their objects die by reference counting), so the collector rarely has anything to do.
Reference counting frees everything else as before; only the cyclic collector's schedule changes. A version
still answering requests when it is unloaded is frozen with them; what it keeps in cycles is freed at the
next version change (at most one model's worth waits so).
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("conveyor.serving")

YOUNG_THRESHOLD = 50_000  # CPython's default is 700


def tune_collector() -> None:
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def freeze_long_lived() -> None:
    """Collects everything (an unloaded version's cycles included) and freezes what survives: called after
    the servables change, on the thread that changed them (the poller's, off the event loop)."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.debug("heap frozen: %d objects in %.2f s", gc.get_freeze_count(), time.perf_counter() - started)
