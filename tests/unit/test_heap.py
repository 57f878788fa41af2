"""The server's garbage-collection schedule (serving/heap.py): loaded models are frozen out of the cyclic
collector's walks, and refreezing after a version change frees what the unloaded version left in cycles;
the model server tells its owner when versions were loaded or unloaded, and only then."""
from __future__ import annotations

import subprocess
import sys
import textwrap

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


def test_the_server_reports_loads_and_unloads_and_nothing_else(tmp_path):
    base = tmp_path / "half_plus_two"
    write_half_plus_two_tflite(base / "1", with_signature_defs=True)
    changes = []
    server = ModelServer(ServerOptions(model_name="half_plus_two", model_base_path=str(base),
                                       file_system_poll_wait_seconds=0, load=LoadOptions(prefer_tflite_model=True)),
                         on_servables_changed=lambda: changes.append(
                             server.model("half_plus_two").available_versions()))
    try:
        server.start_polling()
        assert changes == [[1]]
        server.poll_once()  # nothing new on disk
        assert changes == [[1]]
        write_half_plus_two_tflite(base / "2", with_signature_defs=True)
        server.poll_once()  # version 2 loaded, version 1 unloaded (latest policy): one report after both
        assert changes == [[1], [2]]
    finally:
        server.stop()
