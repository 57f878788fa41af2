"""A fork server for the release crash tests: `python -m tests.release_crash_lab SPEC MODEL_DIR`.

It imports the release code once (TFX included, seconds), then for every request on stdin (one JSON line)
forks a child that runs ONE real operation against the spec's serving base path and ML Metadata store,
and SIGKILLs that child `kill_after` seconds after the child says it is starting, if asked to. One JSON
line per request on stdout says how the child ended. A fork costs milliseconds, so hundreds of real kills
of real processes fit in a CI minute.

Operations, each exactly what a user's process would run:
- push: the ServingPusher executor on a tiny SavedModel, between TFX's own register_execution and
  publish_succeeded_execution (what TFX's launcher does around an executor in `conveyor run`);
- promote / rollback / status: `conveyor_ml.cli.main([...])`, the command line's entry point.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PIPELINE_PUSHER_TYPE = "conveyor_ml.components.serving_pusher.component.ServingPusher"


class Lab:
    def __init__(self, spec_path: str, model_export: str):
        import warnings

        warnings.filterwarnings("ignore")
        from tfx.orchestration import metadata as tfx_metadata
        from tfx.orchestration.portable import execution_publish_utils
        from tfx.orchestration.portable.mlmd import context_lib
        from tfx.types import standard_artifacts

        from conveyor_ml import cli
        from conveyor_ml.base.spec import load_spec
        from conveyor_ml.components.artifacts import Deployment
        from conveyor_ml.components.serving_pusher import executor
        from conveyor_ml.metadata.store import connection_config

        self.spec_path = spec_path
        self.spec = load_spec(spec_path)
        self.model_export = Path(model_export)
        self.cli, self.executor, self.Deployment = cli, executor, Deployment
        self.connection_config, self.tfx_metadata = connection_config, tfx_metadata
        self.publish, self.context_lib, self.artifacts = execution_publish_utils, context_lib, standard_artifacts
        self.scratch = Path(tempfile.mkdtemp(prefix="crash-lab-"))
        self.count = 0

    # -- operations (run in the forked child) -------------------------------------------------------------
    def push(self, request: dict, started) -> int:
        from ml_metadata.proto import metadata_store_pb2

        pusher = self.spec.components.serving_pusher
        work = self.scratch / f"push-{self.count}"
        model = self.artifacts.Model()
        model.uri = str(work / "model")
        (work / "model").mkdir(parents=True)
        os.symlink(self.model_export, work / "model" / "Format-Serving")
        blessing = self.artifacts.ModelBlessing()
        blessing.uri = str(work / "blessing")
        blessing.set_int_custom_property("blessed", 1)
        properties = {"model_name": pusher.model_name, "base_path": str(pusher.base_path),
                      "release": request["mode"], "canary_weight": pusher.canary_weight,
                      "keep_versions": request["keep"], "batching": "{}"}
        outputs = {"pushed_model": [self.artifacts.PushedModel()], "deployment": [self.Deployment()]}
        for key, [artifact] in outputs.items():
            artifact.uri = str(self.spec.pipeline_root / "ServingPusher" / key / f"lab-{os.getpid()}")
            Path(artifact.uri).mkdir(parents=True)
        with self.tfx_metadata.Metadata(self.connection_config(self.spec.metadata)) as handle:
            contexts = [self.context_lib.register_context_if_not_exists(handle, kind, name) for kind, name in (
                ("pipeline", self.spec.name), ("pipeline_run", f"lab-{os.getpid()}"),
                ("node", f"{self.spec.name}.ServingPusher"))]
            started()
            execution = self.publish.register_execution(
                handle, metadata_store_pb2.ExecutionType(name=PIPELINE_PUSHER_TYPE), contexts,
                exec_properties=properties)
            result = self.executor.Executor().Do({"model": [model], "model_blessing": [blessing]}, outputs, properties)
            self.publish.publish_succeeded_execution(handle, execution.id, contexts, outputs, result)
        return 0

    def command(self, request: dict, started) -> int:
        started()
        return self.cli.main([*request["argv"], "--spec", self.spec_path])

    # -- the fork and the kill -----------------------------------------------------------------------------
    def run(self, request: dict) -> dict:
        self.count += 1
        operation = self.push if request["op"] == "push" else self.command
        stdout, stderr = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        ready_read, ready_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()  # or the child would write the parent's buffered text again
        pid = os.fork()
        if pid == 0:  # the child: one operation, then _exit (no cleanup a SIGKILL would skip either)
            os.close(ready_read)
            for target, path in ((1, stdout), (2, stderr)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), target)
            try:
                code = operation(request, lambda: os.write(ready_write, b"g"))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 70
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        os.close(ready_write)
        os.read(ready_read, 1)  # empty if the child died before starting
        os.close(ready_read)
        started = time.perf_counter()
        kill_after = request.get("kill_after")
        if kill_after is not None:
            time.sleep(max(0.0, started + kill_after - time.perf_counter()))
            os.kill(pid, signal.SIGKILL)  # a child that already exited is a zombie: the kill is a no-op
            _, status = os.waitpid(pid, 0)
        else:
            status = _wait(pid, timeout=60.0)
        seconds = time.perf_counter() - started
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        texts = {name: path.read_text(errors="replace") for name, path in (("stdout", stdout), ("stderr", stderr))}
        stdout.unlink()
        stderr.unlink()
        return {"killed": killed, "code": None if killed else os.waitstatus_to_exitcode(status),
                "seconds": seconds, **texts}


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)  # a hung child must not hang the test: report it killed
    return os.waitpid(pid, 0)[1]


def main() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the libraries print goes to stderr, off the protocol
    lab = Lab(sys.argv[1], sys.argv[2])
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        replies.write(json.dumps(lab.run(json.loads(line))) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
