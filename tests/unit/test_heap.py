"""The server's garbage-collection schedule (serving/heap.py): loaded models are frozen out of the cyclic
collector's walks, and refreezing after a version change frees what the unloaded version left in cycles;
the model server tells its owner when versions were loaded or unloaded, once they settle, and only then."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conveyor_ml.serving.model_server import ModelServer, ServerOptions
from conveyor_ml.serving.servable import LoadOptions
from tests.tf_serving_models import write_half_plus_two_tflite


def test_refreezing_frees_cycles_that_were_frozen_and_dropped():
    # In a fresh interpreter: freezing is process-wide and would keep this test process's garbage.
    script = textwrap.dedent("""
        import gc, weakref
        from conveyor_ml.serving import heap

        class Node:
            pass

        node = Node()
        node.itself = node  # a cycle: only the cyclic collector can free it
        alive = weakref.ref(node)
        heap.tune_collector()
        heap.freeze_long_lived()
        print("young threshold", gc.get_threshold()[0], "frozen", gc.get_freeze_count() > 0)
        del node
        gc.collect()
        print("after collect", alive() is not None)
        heap.freeze_long_lived()
        print("after refreeze", alive() is not None)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "young threshold 50000 frozen True"
    assert lines[1] == "after collect True"  # frozen: the collector does not look at it
    assert lines[2] == "after refreeze False"  # unfrozen, collected, gone


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def half_plus_two_server(base: Path, on_change, settle_seconds: float) -> ModelServer:
    """A server of the TFLite half_plus_two model under `base` (version 1 written), polled only when told."""
    write_half_plus_two_tflite(base / "1", with_signature_defs=True)
    return ModelServer(ServerOptions(model_name="half_plus_two", model_base_path=str(base),
                                     file_system_poll_wait_seconds=0, load=LoadOptions(prefer_tflite_model=True)),
                       on_servables_changed=on_change, settle_seconds=settle_seconds)


def test_the_server_reports_settled_versions_once_after_changes_and_not_without(tmp_path):
    base = tmp_path / "half_plus_two"
    changes = []
    server = half_plus_two_server(base, lambda: changes.append(server.model("half_plus_two").available_versions()),
                                  settle_seconds=2.0)
    # Written beforehand and renamed in, so that the two changes land well within the settling time even on
    # a loaded machine (converting a model takes a while; a rename does not).
    for version in (2, 3):
        write_half_plus_two_tflite(tmp_path / "staged" / str(version), with_signature_defs=True)
    try:
        server.start_polling()
        assert changes == [[1]]  # the models loaded before the ports open: reported at once
        (tmp_path / "staged" / "2").rename(base / "2")
        server.poll_once()  # version 2 loaded, version 1 unloaded (latest policy)
        assert changes == [[1]]  # not yet: the new version answers before the heap is refrozen
        (tmp_path / "staged" / "3").rename(base / "3")
        server.poll_once()  # a second change within the settling time: one report for both
        assert wait_for(lambda: len(changes) == 2)
        assert changes == [[1], [3]]
        server.poll_once()  # nothing new on disk: nothing to report
        time.sleep(2.5)
        assert changes == [[1], [3]]
    finally:
        server.stop()


def test_a_stopped_server_reports_nothing_more(tmp_path):
    base = tmp_path / "half_plus_two"
    changes = []
    server = half_plus_two_server(base, lambda: changes.append("settled"), settle_seconds=0.2)
    server.start_polling()
    write_half_plus_two_tflite(base / "2", with_signature_defs=True)
    server.poll_once()
    server.stop()
    time.sleep(0.5)
    assert changes == ["settled"]  # the start-up report only
