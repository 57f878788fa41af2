"""`conveyor run` of the default pipeline: cold (fresh workspace) and cached re-runs, per-component times,
and the orchestration overhead (the runner's total minus the components' own work).

Run: make bench (or .venv/bin/python -m benchmarks.pipeline)."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import spread, write_results

ROOT = Path(__file__).resolve().parent.parent
COMPONENT_LINE = re.compile(r"^\s+[✓↺] (\S+)\s+(?:complete|cached) in ([\d.]+)s")
FINISHED_LINE = re.compile(r"finished in ([\d.]+)s")


def run_once(spec: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "conveyor_ml.cli", "run", str(spec)], cwd=ROOT,
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"conveyor run failed: {result.stderr[-2000:]}")
    components = {m.group(1): float(m.group(2)) for line in result.stdout.splitlines()
                  if (m := COMPONENT_LINE.match(line))}
    pipeline = float(FINISHED_LINE.search(result.stdout).group(1))
    return {"wall_s": wall, "pipeline_s": pipeline, "components": components,
            "overhead_s": pipeline - sum(components.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cold", type=int, default=2, help="cold runs, each in a fresh workspace")
    parser.add_argument("--cached", type=int, default=3, help="cached re-runs after the last cold run")
    args = parser.parse_args(argv)
    cold, cached = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.cold):
            spec = Path(scratch) / f"cold-{index}.yaml"
            spec.write_text(f"extends: {ROOT / 'pipelines' / 'mnist.yaml'}\nworkspace: {scratch}/ws-{index}\n"
                            f"data:\n  schema: {ROOT / 'schemas' / 'mnist' / 'schema.pbtxt'}\n"
                            f"metadata:\n  sqlite: {scratch}/ws-{index}/metadata.sqlite\n"
                            f"components:\n  serving_pusher: {{base_path: {scratch}/ws-{index}/serving}}\n")
            cold.append(run_once(spec))
            print(f"cold run {index + 1}: {cold[-1]['wall_s']:.1f}s", flush=True)
        for index in range(args.cached):
            cached.append(run_once(spec))
            print(f"cached run {index + 1}: {cached[-1]['wall_s']:.1f}s", flush=True)
    figures = {"cold_wall_s": spread([r["wall_s"] for r in cold]), "cold_pipeline_s": spread([r["pipeline_s"] for r in cold]),
               "cold_overhead_s": spread([r["overhead_s"] for r in cold]),
               "cached_wall_s": spread([r["wall_s"] for r in cached]),
               "cached_pipeline_s": spread([r["pipeline_s"] for r in cached])}
    components = {name: spread([r["components"][name] for r in cold if name in r["components"]])
                  for name in cold[0]["components"]}

    def row(label: str, f: dict) -> str:
        return f"| {label} | {f['median']:.1f} s | {f['min']:.1f}–{f['max']:.1f} s |"

    markdown = ("# Pipeline benchmark\n\nThe default pipeline (`pipelines/mnist.yaml`: "
                f"{len(components)} nodes, 600 training steps), {args.cold} cold runs in fresh workspaces and {args.cached} cached re-runs. Wall time is the "
                "whole `conveyor run` process (Python and TensorFlow start-up included); pipeline time is the "
                "runner's; overhead is pipeline time minus the sum of the components' own times.\n\n"
                "| figure | median | min–max |\n|---|---|---|\n" + "\n".join([
                    row("cold run, wall", figures["cold_wall_s"]), row("cold run, pipeline", figures["cold_pipeline_s"]),
                    row("cold run, orchestration overhead", figures["cold_overhead_s"]),
                    row("cached re-run, wall", figures["cached_wall_s"]),
                    row("cached re-run, pipeline", figures["cached_pipeline_s"])]) +
                "\n\nPer component (cold runs):\n\n| component | median | min–max |\n|---|---|---|\n" +
                "\n".join(row(name, f) for name, f in components.items()) + "\n")
    write_results("pipeline", {"cold": cold, "cached": cached, "figures": figures, "components": components}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
