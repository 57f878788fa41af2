"""`conveyor run` of the default pipeline: cold (fresh workspace) and cached re-runs, per-component times,
and the orchestration overhead (the runner's total minus the components' own work).

Run: make bench (or .venv/bin/python -m benchmarks.pipeline)."""
from __future__ import annotations

import argparse
import os
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


def run_once(spec: Path, code: Path | None = None) -> dict:
    """One `conveyor run`, of this tree's code or of another tree's (`code`, e.g. a baseline commit's)."""
    env = {**os.environ, "PYTHONPATH": str(code)} if code else None
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "conveyor_ml.cli", "run", str(spec)], cwd=code or ROOT,
                            capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"conveyor run failed: {result.stderr[-2000:]}")
    components = {m.group(1): float(m.group(2)) for line in result.stdout.splitlines()
                  if (m := COMPONENT_LINE.match(line))}
    pipeline = float(FINISHED_LINE.search(result.stdout).group(1))
    return {"wall_s": wall, "pipeline_s": pipeline, "components": components,
            "overhead_s": pipeline - sum(components.values())}


def write_spec(scratch: str, name: str) -> Path:
    spec = Path(scratch) / f"{name}.yaml"
    spec.write_text(f"extends: {ROOT / 'pipelines' / 'mnist.yaml'}\nworkspace: {scratch}/ws-{name}\n"
                    f"data:\n  schema: {ROOT / 'schemas' / 'mnist' / 'schema.pbtxt'}\n"
                    f"metadata:\n  sqlite: {scratch}/ws-{name}/metadata.sqlite\n"
                    f"components:\n  serving_pusher: {{base_path: {scratch}/ws-{name}/serving}}\n")
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cold", type=int, default=2, help="cold runs, each in a fresh workspace")
    parser.add_argument("--cached", type=int, default=3, help="cached re-runs after the last cold run")
    parser.add_argument("--baseline-commit", default="",
                        help="also run this commit's code, each run right after this tree's, and compare")
    args = parser.parse_args(argv)
    cold, cached = [], []
    baseline: dict[str, list] = {"cold": [], "cached": []}
    with tempfile.TemporaryDirectory() as scratch:
        code = None
        if args.baseline_commit:
            from benchmarks.scale import baseline_tree

            code = baseline_tree(args.baseline_commit, Path(scratch))
        for index in range(args.cold):
            spec = write_spec(scratch, f"cold-{index}")
            cold.append(run_once(spec))
            print(f"cold run {index + 1}: {cold[-1]['wall_s']:.1f}s", flush=True)
            if code:
                baseline_spec = write_spec(scratch, f"baseline-cold-{index}")
                baseline["cold"].append(run_once(baseline_spec, code))
                print(f"baseline cold run {index + 1}: {baseline['cold'][-1]['wall_s']:.1f}s", flush=True)
        for index in range(args.cached):
            cached.append(run_once(spec))
            print(f"cached run {index + 1}: {cached[-1]['wall_s']:.1f}s", flush=True)
            if code:
                baseline["cached"].append(run_once(baseline_spec, code))
                print(f"baseline cached run {index + 1}: {baseline['cached'][-1]['wall_s']:.1f}s", flush=True)
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
    if args.baseline_commit:
        before = {"cold": spread([r["wall_s"] for r in baseline["cold"]]),
                  "cached": spread([r["wall_s"] for r in baseline["cached"]])}
        markdown += (f"\nAgainst commit {args.baseline_commit} (each of its runs right after one of this tree's, same "
                     "machine, same load):\n\n| run, wall | this tree | baseline |\n|---|---|---|\n"
                     f"| cold | {figures['cold_wall_s']['median']:.1f} s | {before['cold']['median']:.1f} s |\n"
                     f"| cached | {figures['cached_wall_s']['median']:.1f} s | {before['cached']['median']:.1f} s |\n")
        figures["baseline"] = {"commit": args.baseline_commit, **before}
    write_results("pipeline", {"cold": cold, "cached": cached, "figures": figures, "components": components,
                               "baseline_runs": baseline}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
