"""`conveyor`: the command line. User mistakes print one line and exit 2; bugs keep their traceback."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ start-up lines (CUDA factories, CPU features) say nothing a user can act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# ML Metadata's C++ logs each failed MySQL connection (with advice about MySQL 8 authentication, whatever the
# cause) on top of the error it raises, which the command reports as one line.
os.environ.setdefault("GLOG_minloglevel", "3")
warnings.filterwarnings("ignore", message=".*non-supported Python version.*", category=FutureWarning)

from conveyor_ml.base import cli_values as values  # noqa: E402
from conveyor_ml.base.closed_output import survive_closed_output  # noqa: E402
from conveyor_ml.base.errors import ConveyorError  # noqa: E402
from conveyor_ml.base.names import NUM_CLASSES  # noqa: E402
from conveyor_ml.base.process_lifetime import Terminated, raise_on_sigterm  # noqa: E402

DEFAULT_SPEC = "pipelines/mnist.yaml"


def _quiet_libraries() -> None:
    """TFX, Beam and Google client libraries warn about things users cannot act on."""
    warnings.filterwarnings("ignore")
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    # A failing component is reported by the run's own progress line and error; bugs still raise
    # with their traceback, so the libraries' own error logs would only repeat it.
    for name in ("apache_beam", "absl"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def cmd_validate(args) -> int:
    from conveyor_ml.base.spec import load_spec

    spec = load_spec(args.spec)
    names = [name for name, value in vars(spec.components).items() if value]
    print(f"{args.spec}: valid pipeline '{spec.name}' with {', '.join(names)}")
    return 0


def cmd_run(args) -> int:
    from conveyor_ml.base.spec import load_spec

    spec = load_spec(args.spec)
    if args.gcp_dry_run:
        from dataclasses import replace

        if spec.components.gcp_pusher is None:
            raise ConveyorError(f"{spec.source_file}: --gcp-dry-run needs a components.gcp_pusher section")
        spec = replace(spec, components=replace(spec.components,
                                                gcp_pusher=replace(spec.components.gcp_pusher, dry_run=True)))
    _quiet_libraries()
    from conveyor_ml.metadata.store import check_store
    from conveyor_ml.pipelines.workspace import check_workspace, prepare_data, run_temporary_directory

    # Beam and TFX name their temporary files without an owner: under the run's own temporary directory, the
    # next run removes what a killed one left (pipelines/workspace.py).
    with run_temporary_directory():
        check_store(spec.metadata)  # an unreachable MySQL store: one line, before anything is written
        check_workspace(spec)
        prepare_data(spec)
        from conveyor_ml.pipelines.run_summary import print_summary
        from conveyor_ml.pipelines.runner import run_pipeline

        result = run_pipeline(spec)
        print_summary(spec, result)
    return 0


def cmd_data_init(args) -> int:
    from conveyor_ml.base.spec import load_spec

    spec = load_spec(args.spec)
    _quiet_libraries()
    from conveyor_ml.data.ingestion import check_data_root
    from conveyor_ml.pipelines.workspace import check_workspace, prepare_data

    check_data_root(spec.data_root)  # before check_workspace, which writes a probe into the workspace
    check_workspace(spec)
    latest = prepare_data(spec)
    print(f"conveyor: data ready under {spec.data_root} (latest span: {latest})")
    return 0


def cmd_data_add_span(args) -> int:
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.data import datasets

    spec = load_spec(args.spec)
    _quiet_libraries()
    span, manifest = datasets.add_span(spec.data_root, image_shape=spec.data.image_shape,
                                       eval_fraction=spec.data.eval_fraction, files=args.from_files,
                                       brightness=args.brightness, imbalance=args.imbalance,
                                       beam_args=tuple(spec.beam.args))
    shift = f", shift {manifest['shift']}" if "shift" in manifest else ""
    print(f"conveyor: wrote span-{span} ({manifest['examples']['train']} train, {manifest['examples']['eval']} eval "
          f"examples from {manifest['source']}{shift}) to {datasets.span_dir(spec.data_root, span)} "
          f"in {manifest['ingestion_seconds']:.1f}s")
    return 0


def cmd_schedule(args) -> int:
    from pathlib import Path

    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.pipelines.scheduler import Scheduler, cron_line

    spec = load_spec(args.spec)
    if args.print_cron:
        print(cron_line(Path(args.spec).resolve(), args.every, spec.schedule.cron, Path.cwd(), spec.workspace,
                        args.on_new_data))
        return 0
    scheduler = Scheduler(spec, Path(args.spec).resolve(), every=args.every, on_new_data=args.on_new_data,
                          max_runs=args.max_runs, retries=args.retries, backoff=args.retry_backoff, poll=args.poll)
    return scheduler.loop()


def cmd_compile(args) -> int:
    import tempfile
    from pathlib import Path

    from conveyor_ml.base.files import write_atomically
    from conveyor_ml.base.spec import load_spec

    spec = load_spec(args.spec)
    _quiet_libraries()
    from conveyor_ml.pipelines.compile import compile_pipeline, schedule_hint

    output = Path(args.output)
    with tempfile.TemporaryDirectory() as scratch:  # the -o file appears whole, or not at all
        compiled = Path(scratch) / output.name
        document = compile_pipeline(spec, compiled)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(output, compiled.read_bytes())
        except OSError as exc:
            raise ConveyorError(f"-o {output}: cannot write it ({exc.strerror})") from None
    tasks = document["pipelineSpec"]["root"]["dag"]["tasks"]
    print(f"conveyor: wrote {output}: {len(tasks)} steps for {args.target} "
          f"(image {spec.kubeflow.image}, pipeline root {spec.kubeflow.pipeline_root})")
    hint = schedule_hint(spec, output, args.target)
    if hint:
        print(f"conveyor: {hint}")
    return 0


def _optional_spec(path: str | None):
    """The spec a user named (which must then exist), else the default one if it is here, else None: monitor
    and doctor also work on a server or a model directory alone."""
    from pathlib import Path

    from conveyor_ml.base.spec import load_spec

    if path is None:
        return load_spec(DEFAULT_SPEC) if Path(DEFAULT_SPEC).is_file() else None
    return load_spec(path)


def _local_dry_run(args) -> None:
    if args.dry_run:
        raise ConveyorError(f"{args.command} --dry-run previews a Vertex AI change and needs --target gcp; "
                            "`conveyor status` shows the local labels and traffic, and this command's change is "
                            "undone by the opposite one")


def cmd_monitor(args) -> int:
    from conveyor_ml.operations.monitor import monitor

    spec = _optional_spec(args.spec)
    return monitor(args.url, args.model, spec, once=args.once, fmt=args.format, interval=args.interval,
                   drift_threshold=args.drift_threshold)


def cmd_doctor(args) -> int:
    import json

    from conveyor_ml.operations.doctor import diagnose, render, resolve_target

    spec = _optional_spec(args.spec)
    _quiet_libraries()
    target = resolve_target(spec, args.model_dir, args.serving_dir, args.url)
    report = diagnose(target)
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(render(report), end="")
    return 1 if report.failed else 0


def cmd_serve(args) -> int:
    _quiet_libraries()
    from conveyor_ml.serving.server import run

    return run(args)


def _print_status(report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"serving base path: {report.base_path}")
    for model in report.models:
        server = model.server
        table = Table(title=f"model {model.model}", title_justify="left")
        for column in ("version", "labels", "traffic", "on disk", "server", "pushed by run"):
            table.add_column(column)
        for row in model.versions:
            table.add_row(str(row.version), ", ".join(row.labels) or "-", f"{row.traffic_percent}%",
                          "yes" if row.on_disk else "MISSING",
                          row.server_state or ("-" if server.up else "not running"), row.pushed_by_run or "-")
        console.print(table)
        console.print(f"server {server.url}: {'up' if server.up else 'not running'};  "
                      f"stable history: {' -> '.join(map(str, model.stable_history)) or '-'}")


def cmd_status(args) -> int:
    import json

    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.operations.release_commands import status

    report = status(load_spec(args.spec), args.model, args.url)
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_status(report)
    return 0


def _print_vertex_change(args, rows: list[dict]) -> int:
    print(f"conveyor: Vertex AI endpoint traffic{' (dry run: unchanged)' if args.dry_run else ''}:")
    for row in rows:
        print(f"  version {row['version']}: {row['label'] or row['release_state']} {row['traffic_percent']}% "
              f"(deployed model {row['deployed_model_id']})")
    return 0


def cmd_promote(args) -> int:
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.operations.release_commands import PROMOTE, change_release, change_vertex_release

    if args.target == "gcp":
        return _print_vertex_change(args, change_vertex_release(
            load_spec(args.spec), args.model, PROMOTE, weight=args.weight, reason=args.reason, dry_run=args.dry_run))
    _local_dry_run(args)
    release = change_release(load_spec(args.spec), args.model, PROMOTE, weight=args.weight, reason=args.reason)
    print(f"conveyor: {args.model}: labels {release.labels}, traffic {release.weights}")
    return 0


def cmd_rollback(args) -> int:
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.operations.release_commands import ROLLBACK, change_release, change_vertex_release

    if args.target == "gcp":
        if args.to is not None:
            raise ConveyorError("rollback --target gcp: --to is for local versions; on Vertex AI a rollback "
                                "drops the canary (push an older model with canary_weight 100 to go further back)")
        return _print_vertex_change(args, change_vertex_release(
            load_spec(args.spec), args.model, ROLLBACK, reason=args.reason, dry_run=args.dry_run))
    _local_dry_run(args)
    release = change_release(load_spec(args.spec), args.model, ROLLBACK, to_version=args.to, reason=args.reason)
    print(f"conveyor: {args.model}: stable is now version {release.labels['stable']} (100%), no canary")
    return 0


def cmd_canary(args) -> int:
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.operations.release_commands import release_variant_canary

    release = release_variant_canary(load_spec(args.spec), args.model, args.variant, weight=args.weight,
                                     from_version=args.from_version, reason=args.reason)
    canary, stable = release.labels["canary"], release.labels["stable"]
    print(f"conveyor: {args.model}: version {canary} = the {args.variant} variant, canary at {args.weight}% "
          f"(stable {stable} at {100 - args.weight}%); `conveyor monitor {args.model}` compares them")
    return 0


def cmd_release_shadow(args) -> int:
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.operations.progressive_delivery import end_shadow, shadow_summary, start_shadow

    if args.end and args.version is not None:
        raise ConveyorError("release shadow --end ends the model's shadow phase, whichever version it shadows; "
                            "drop --version")
    spec = load_spec(args.spec)
    if args.end:
        version, figures = end_shadow(spec, args.model, args.url, reason=args.reason)
        print(f"conveyor: {args.model}: shadow phase of version {version} ended: {shadow_summary(figures)} "
              "(recorded in ML Metadata)")
        return 0
    if args.version is None:
        raise ConveyorError("release shadow: give --version N (and --percent P), or --end")
    release = start_shadow(spec, args.model, args.version, args.percent, reason=args.reason)
    print(f"conveyor: {args.model}: version {args.version} shadows {args.percent}% of live requests "
          f"(stable {release.labels.get('stable')} answers them); `conveyor monitor {args.model}` compares them")
    return 0


def cmd_release_canary(args) -> int:
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.operations.progressive_delivery import analyse_canary, analysis_settings
    from conveyor_ml.operations.release_commands import CanarySource

    if (args.version is None) == (args.variant is None):
        raise ConveyorError("release canary: give one of --version N (a pushed version) or --variant V")
    spec = load_spec(args.spec)
    settings = analysis_settings(
        spec, steps=args.steps, interval_seconds=args.interval, max_error_rate=args.max_error_rate,
        max_p99_ratio=args.max_p99_ratio, min_agreement=args.min_agreement,
        min_live_accuracy_drop=args.min_live_accuracy_drop, min_requests=args.min_requests,
        route_key=args.route_key, server_url=args.url)
    source = CanarySource(version=args.version, variant=args.variant, from_version=args.from_version)
    verdict = analyse_canary(spec, args.model, source, settings, reason=args.reason)
    return 0 if verdict.verdict == "promoted" else 1


def cmd_models(args) -> int:
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.operations.lineage_commands import models

    return models(load_spec(args.spec), args.model, args.format, args.output)


def cmd_lineage(args) -> int:
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.operations.lineage_commands import lineage

    return lineage(load_spec(args.spec), args.model, version=args.version, label=args.label, run_id=args.run_id,
                   fmt=args.format, output=args.output)


def cmd_runs(args) -> int:
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.operations.lineage_commands import runs

    return runs(load_spec(args.spec), args.format, args.limit)


def cmd_deploy_render(args) -> int:
    from pathlib import Path

    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.formats import release_state as releases
    from conveyor_ml.operations import manifests

    spec = load_spec(args.spec)
    pusher = spec.components.serving_pusher
    if pusher is None:
        raise ConveyorError(f"{args.spec}: no components.serving_pusher, so there is nothing to deploy")
    names = releases.known_models(pusher.base_path)
    if not names:
        raise ConveyorError(f"nothing pushed under {pusher.base_path} yet: run `make pipeline` first")
    state = [releases.read_release(pusher.base_path, name) for name in names]
    out_dir = Path(args.output or spec.workspace / "deploy" / args.target)
    if args.target == "compose":
        written = manifests.render_compose(state, pusher.base_path, pusher.batching, out_dir)
    else:
        written = manifests.render_k8s(state, pusher.batching, pusher.autoscaling, out_dir)
    for path in written:
        print(f"conveyor: wrote {path}")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one line (the usage is one `--help` away) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="conveyor", description="Declarative TFX pipelines from training to serving.")
    spec_help = f"pipeline YAML (default {DEFAULT_SPEC})"
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run a pipeline spec end to end")
    run.add_argument("spec", nargs="?", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    run.add_argument("--gcp-dry-run", action="store_true",
                     help="the GcpPusher prints every Cloud Storage and Vertex AI call it would make, and makes none")
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="check a spec against the schema; build nothing")
    validate.add_argument("spec", nargs="?", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    validate.set_defaults(handler=cmd_validate)

    data = commands.add_parser("data", help="manage data spans").add_subparsers(
        dest="data_command", metavar="ACTION", required=True)
    init = data.add_parser("init", help="write span-1 from the spec's data source (no-op if spans exist)")
    init.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    init.set_defaults(handler=cmd_data_init)
    add_span = data.add_parser("add-span", help="write the next span (new data) from files or the embedded digits")
    add_span.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    origin = add_span.add_mutually_exclusive_group()
    origin.add_argument("--from", dest="from_files", nargs="+", metavar="FILE", type=values.existing_path,
                        help=".tfrecord(.gz) files, one .csv file, or a directory of MNIST IDX files")
    origin.add_argument("--embedded", action="store_true", help="the embedded digits' held-back part (default)")
    add_span.add_argument("--brightness", type=values.number(above=0),
                          help="shift: multiply every pixel (e.g. 0.5), to show drift")
    add_span.add_argument("--imbalance", metavar="CLASS:FRACTION", type=values.class_fraction(NUM_CLASSES),
                          help="shift: resample so CLASS is FRACTION of the span (0 < FRACTION < 1)")
    add_span.set_defaults(handler=cmd_data_add_span)

    schedule = commands.add_parser("schedule", help="run the pipeline on new data and/or on an interval")
    schedule.add_argument("spec", nargs="?", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    schedule.add_argument("--every", type=values.duration, help="interval between runs, e.g. 30m, 6h")
    schedule.add_argument("--on-new-data", action="store_true", help="run when a new span appears (and only then)")
    schedule.add_argument("--max-runs", type=values.integer(minimum=1), help="exit after this many triggers")
    schedule.add_argument("--retries", type=values.integer(minimum=0), default=2,
                          help="retries of a failed run (default 2)")
    schedule.add_argument("--retry-backoff", type=values.duration, default="60s",
                          help="first retry delay, doubling (default 60s)")
    schedule.add_argument("--poll", type=values.duration, default="10s",
                          help="how often to look for a new span (default 10s)")
    schedule.add_argument("--print-cron", action="store_true", help="print an equivalent crontab line and exit")
    schedule.set_defaults(handler=cmd_schedule)

    monitor = commands.add_parser("monitor", help="live view of a running server: QPS, latency, drift, accuracy")
    monitor.add_argument("model", nargs="?", help="one model (default: every model the server reports)")
    monitor.add_argument("--url", default="http://127.0.0.1:8501", type=values.http_url,
                         help="the server's REST address")
    monitor.add_argument("--spec", type=values.spec_path,
                         help=f"for the training label distribution (MLMD; default {DEFAULT_SPEC} if it exists)")
    monitor.add_argument("--once", action="store_true", help="one snapshot, then exit")
    monitor.add_argument("--format", choices=("table", "json"), default="table")
    monitor.add_argument("--interval", type=values.number(maximum=86400, above=0), default=2.0,
                         help="seconds between the two scrapes of a snapshot")
    monitor.add_argument("--drift-threshold", type=values.number(above=0, maximum=1), default=0.15,
                         help="L-infinity distance between predicted and training class shares that flags drift")
    monitor.set_defaults(handler=cmd_monitor)

    compile_ = commands.add_parser("compile", help="the DAG as a Kubeflow Pipelines v2 / Vertex AI Pipelines job")
    compile_.add_argument("spec", nargs="?", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    compile_.add_argument("--target", choices=("kubeflow", "vertex"), default="vertex")
    compile_.add_argument("-o", "--output", default="pipeline.json", type=values.output_file(".json"),
                          help="the JSON file to write (default pipeline.json)")
    compile_.set_defaults(handler=cmd_compile)

    status = commands.add_parser("status", help="versions on disk, labels, traffic, server state, producing runs")
    status.add_argument("model", nargs="?", help="one model (default: all in models.config)")
    status.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    status.add_argument("--url", default="http://127.0.0.1:8501", type=values.http_url,
                        help="a running server's REST address")
    status.add_argument("--format", choices=("table", "json"), default="table")
    status.set_defaults(handler=cmd_status)

    def lineage_command(name: str, help_text: str, handler):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("model", nargs="?", help="default: the spec's serving model")
        command.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
        command.add_argument("--format", choices=("table", "json", "dot", "html"), default="table")
        command.add_argument("-o", "--output", type=values.output_file(), help="write to this file instead of stdout")
        command.set_defaults(handler=handler)
        return command

    lineage_command("models", "every version of a model: data, accuracy, deployments, state", cmd_models)
    which = lineage_command("lineage", "one version from its data to live traffic",
                            cmd_lineage).add_mutually_exclusive_group()
    which.add_argument("--version", type=values.version_number, help="a pushed version (local or Vertex AI)")
    which.add_argument("--label", help="the version a label (stable, canary) points to now")
    which.add_argument("--run", dest="run_id", help="the model a pipeline run trained")

    runs = commands.add_parser("runs", help="pipeline runs: status, duration, cached components, outputs")
    runs.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    runs.add_argument("--format", choices=("table", "json"), default="table")
    runs.add_argument("--limit", type=values.integer(minimum=1), help="only the newest N runs")
    runs.set_defaults(handler=cmd_runs)

    promote = commands.add_parser("promote", help="canary -> stable at 100%% (or --weight N: canary at N%%)")
    promote.add_argument("model")
    promote.add_argument("--weight", type=values.integer(1, 100),
                         help="step the canary's share to N%% instead of promoting (1..100)")
    promote.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    promote.add_argument("--reason", default="", help="recorded with the change in ML Metadata")
    promote.add_argument("--target", choices=("local", "gcp"), default="local",
                         help="the local serving base path, or the spec's Vertex AI endpoint")
    promote.add_argument("--dry-run", action="store_true", help="gcp: read the endpoint, print the changes, send none")
    promote.set_defaults(handler=cmd_promote)

    rollback = commands.add_parser("rollback", help="stable back to the previous stable (or --to VERSION)")
    rollback.add_argument("model")
    rollback.add_argument("--to", type=values.integer(minimum=1), help="the version to make stable")
    rollback.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    rollback.add_argument("--reason", default="")
    rollback.add_argument("--target", choices=("local", "gcp"), default="local")
    rollback.add_argument("--dry-run", action="store_true", help="gcp: read the endpoint, print the changes, send none")
    rollback.set_defaults(handler=cmd_rollback)

    canary = commands.add_parser("canary", help="release a pushed TFLite variant (e.g. int8) as the canary version")
    canary.add_argument("model")
    canary.add_argument("--variant", required=True,
                        help="a variant the Quantizer blessed and the ServingPusher pushed: float16, dynamic_range, int8")
    canary.add_argument("--weight", type=values.integer(1, 99), default=10, help="percent of traffic (default 10)")
    canary.add_argument("--from-version", type=values.integer(minimum=1),
                        help="the version whose variant to release (default: the stable one)")
    canary.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    canary.add_argument("--reason", default="", help="recorded with the change in ML Metadata")
    canary.set_defaults(handler=cmd_canary)

    release = commands.add_parser("release", help="progressive delivery: shadow traffic, analysed canaries").add_subparsers(
        dest="release_command", metavar="ACTION", required=True)
    shadow = release.add_parser("shadow", help="mirror a share of live requests to a version in the background and "
                                "compare its answers (never returned); --end records the figures")
    shadow.add_argument("model")
    shadow.add_argument("--version", type=values.integer(minimum=1), help="the version to shadow (on disk)")
    shadow.add_argument("--percent", type=values.integer(1, 100), default=100,
                        help="percent of live requests mirrored (default 100)")
    shadow.add_argument("--end", action="store_true", help="end the shadow phase: record the server's figures "
                        "in ML Metadata and remove the shadow label")
    shadow.add_argument("--url", default="http://127.0.0.1:8501", type=values.http_url,
                        help="the server whose figures --end records")
    shadow.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    shadow.add_argument("--reason", default="", help="recorded with the change in ML Metadata")
    shadow.set_defaults(handler=cmd_release_shadow)
    analysed = release.add_parser("canary", help="a canary whose weight rises step by step while the server's "
                                  "metrics stay inside the thresholds; any breach rolls it back, the last step "
                                  "promotes it (exit 0: promoted, 1: not)")
    analysed.add_argument("model")
    analysed.add_argument("--version", type=values.integer(minimum=1), help="the version to release (on disk)")
    analysed.add_argument("--variant", help="release the stable version's pushed TFLite variant (e.g. int8) instead")
    analysed.add_argument("--from-version", type=values.integer(minimum=1),
                          help="--variant: the version whose variant to release (default: the stable one)")
    defaults = "default: the spec's serving_pusher.analysis, else"
    analysed.add_argument("--steps", type=values.percent_steps, help=f"canary percents ({defaults} 10,25,50,100)")
    analysed.add_argument("--interval", type=values.duration, help=f"each step's window, e.g. 30s, 5m ({defaults} 5m)")
    analysed.add_argument("--max-error-rate", type=values.share, help=f"e.g. 1%% ({defaults} 1%%)")
    analysed.add_argument("--max-p99-ratio", type=values.number(minimum=0.01),
                          help=f"canary p99 / stable p99 ({defaults} 1.2)")
    analysed.add_argument("--min-agreement", type=values.share,
                          help=f"canary answers agreeing with stable's on the same input, e.g. 98%% ({defaults} 98%%)")
    analysed.add_argument("--min-live-accuracy-drop", type=values.points,
                          help=f"canary live accuracy minus stable's, e.g. -1pt ({defaults} -1pt)")
    analysed.add_argument("--min-requests", type=values.integer(minimum=1),
                          help=f"canary requests a window needs to decide ({defaults} 20)")
    analysed.add_argument("--route-key", type=values.header_name,
                          help="split by a hash of this request header (sticky per user)")
    analysed.add_argument("--url", type=values.http_url, help=f"the server whose metrics decide ({defaults} "
                          "http://127.0.0.1:8501)")
    analysed.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    analysed.add_argument("--reason", default="", help="recorded with the release in ML Metadata")
    analysed.set_defaults(handler=cmd_release_canary)

    doctor = commands.add_parser("doctor", help="check a model, its serving directory and a running server against "
                                 "the serving guide's checklist (OK / WARN / FAIL, with the fix)")
    doctor.add_argument("--spec", type=values.spec_path, help="the pipeline whose pushed model, data and metadata to "
                        f"check (default {DEFAULT_SPEC} if it exists)")
    doctor.add_argument("--model-dir", help="a SavedModel version directory (default: the stable version pushed)")
    doctor.add_argument("--serving-dir", help="a serving base path (default: the spec's)")
    doctor.add_argument("--url", default="http://127.0.0.1:8501", type=values.http_url,
                        help="a running server's REST address")
    doctor.add_argument("--format", choices=("table", "json"), default="table")
    doctor.set_defaults(handler=cmd_doctor)

    deploy = commands.add_parser("deploy", help="production manifests for TensorFlow Serving").add_subparsers(
        dest="deploy_command", metavar="ACTION", required=True)
    render = deploy.add_parser("render", help="write docker-compose or Kubernetes/Istio manifests")
    render.add_argument("--target", choices=("compose", "k8s"), required=True)
    render.add_argument("-o", "--output", type=values.output_directory,
                        help="directory to write (default workspace/deploy/<target>)")
    render.add_argument("--spec", default=DEFAULT_SPEC, type=values.spec_path, help=spec_help)
    render.set_defaults(handler=cmd_deploy_render)

    serve = commands.add_parser("serve", help="serve models over TF Serving's REST and gRPC APIs")
    from conveyor_ml.serving.server import add_arguments

    add_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `conveyor serve` re-runs per server process
    standalone = argv is None and threading.current_thread() is threading.main_thread()
    if standalone:
        raise_on_sigterm()  # SIGTERM cleans up as Ctrl-C does (children stopped, temporary files removed)
        survive_closed_output()  # `| head`, or a killed scheduler's pipe: the command goes on, unread
    try:
        code = args.handler(args)
        if standalone:
            # Done: a Ctrl-C or SIGTERM while the interpreter shuts TensorFlow down (1-2 s) printed a traceback
            # from an exit handler, or turned a success already printed into exit 130.
            sys.stdout.flush()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return code
    except ConveyorError as exc:
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _stopped(exc)
    except Exception as exc:
        interrupt = _interruption(exc)
        if interrupt is None:
            raise
        return _stopped(interrupt)


def _interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) that `exc` stands for, if any: Beam re-raises a KeyboardInterrupt inside a step as
    a RuntimeError ("KeyboardInterrupt [while running 'Run[Trainer]']") whose context is the interrupt."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _stopped(interrupt: KeyboardInterrupt) -> int:
    """One line and the shell's status for a command stopped by a signal (128 + its number)."""
    if isinstance(interrupt, Terminated):
        print("conveyor: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    print("conveyor: interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
