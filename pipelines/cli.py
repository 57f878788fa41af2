"""`conveyor`: the command line. User mistakes print one line and exit 2; bugs keep their traceback."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipelines.errors import ConveyorError  # noqa: E402

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
    from pipelines.spec import load_spec

    spec = load_spec(args.spec)
    names = [name for name, value in vars(spec.components).items() if value]
    print(f"{args.spec}: valid pipeline '{spec.name}' with {', '.join(names)}")
    return 0


def cmd_run(args) -> int:
    from pipelines.spec import load_spec

    spec = load_spec(args.spec)
    _quiet_libraries()
    from pipelines.workspace import check_workspace, prepare_data

    check_workspace(spec)
    prepare_data(spec)
    from pipelines.run_summary import print_summary
    from pipelines.runner import run_pipeline

    result = run_pipeline(spec)
    print_summary(spec, result)
    return 0


def cmd_data_init(args) -> int:
    from pipelines.spec import load_spec

    spec = load_spec(args.spec)
    _quiet_libraries()
    from pipelines.workspace import check_workspace, prepare_data

    check_workspace(spec)
    latest = prepare_data(spec)
    print(f"conveyor: data ready under {spec.data_root} (latest span: {latest})")
    return 0


def cmd_serve(args) -> int:
    _quiet_libraries()
    from serving.server import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor", description="Declarative TFX pipelines from training to serving.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run a pipeline spec end to end")
    run.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"pipeline YAML (default {DEFAULT_SPEC})")
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="check a spec against the schema; build nothing")
    validate.add_argument("spec", nargs="?", default=DEFAULT_SPEC)
    validate.set_defaults(handler=cmd_validate)

    data = commands.add_parser("data", help="manage data spans").add_subparsers(
        dest="data_command", metavar="ACTION", required=True)
    init = data.add_parser("init", help="write span-1 from the spec's data source (no-op if spans exist)")
    init.add_argument("--spec", default=DEFAULT_SPEC)
    init.set_defaults(handler=cmd_data_init)
    serve = commands.add_parser("serve", help="serve models over TF Serving's REST and gRPC APIs")
    from serving.server import add_arguments

    add_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConveyorError as exc:
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conveyor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
