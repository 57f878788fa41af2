"""The data path at scale: synthetic 28x28 digits in MNIST's IDX format (benchmarks/synthetic_mnist.py,
deterministic, no download) at 10k, 100k and 1M examples, through `conveyor data init` and `conveyor run` of
the default pipeline (only the data source, image shape and schema changed). For each size: wall time and
peak resident memory of every process of the run together (the CLI, Beam workers, the training and serving
children), in total and per component. Also the ingestion against the commit before the streaming data path
(`--baseline-commit`), on the same data.

Run: make bench (or .venv/bin/python -m benchmarks.scale [--sizes 10000 100000]).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.common import RESULTS, write_results
from benchmarks.synthetic_mnist import write_dataset

ROOT = Path(__file__).resolve().parent.parent
SIZES = (10_000, 100_000, 1_000_000)
STARTED = re.compile(r"^\s+▶ (\S+)")
FINISHED = re.compile(r"^\s+[✓↺–] (\S+)\s+\S+ in ([\d.]+)s")
# The commit before the streaming data path: whole-source reads, one serialisation loop, float pixels.
BASELINE_COMMIT = "4795507"


class TreeMonitor:
    """Samples the summed RSS of a process and all its descendants, and timestamps its output lines."""

    def __init__(self, process: subprocess.Popen, interval: float = 0.2):
        self.process, self.interval = process, interval
        self.samples: list[tuple[float, int]] = []
        self.lines: list[tuple[float, str]] = []
        self.started = time.perf_counter()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._sampler.start()
        self._reader.start()

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.process.pid)
        except psutil.NoSuchProcess:
            return
        while self.process.poll() is None:
            total = 0
            try:
                for member in [root, *root.children(recursive=True)]:
                    try:
                        total += member.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.samples.append((time.perf_counter() - self.started, total))
            time.sleep(self.interval)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.perf_counter() - self.started, line.rstrip("\n")))

    def wait(self) -> float:
        self.process.wait()
        self._reader.join()
        self._sampler.join()
        return time.perf_counter() - self.started

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        inside = [rss for t, rss in self.samples if start <= t <= end]
        return max(inside) if inside else 0


def run_monitored(argv: list[str], env: dict | None = None, cwd: Path = ROOT) -> dict:
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **(env or {})})
    monitor = TreeMonitor(process)
    wall = monitor.wait()
    output = "\n".join(line for _, line in monitor.lines)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{output[-3000:]}")
    components, opened = {}, {}
    for at, line in monitor.lines:
        if match := STARTED.match(line):
            opened[match.group(1)] = at
        elif (match := FINISHED.match(line)) and match.group(1) in opened:
            start = opened.pop(match.group(1))
            components[match.group(1)] = {"seconds": float(match.group(2)), "peak_rss_mb": monitor.peak(start, at) / 2**20}
    return {"wall_s": wall, "peak_rss_mb": monitor.peak() / 2**20, "components": components, "output": output}


def write_spec(directory: Path, data: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    spec = directory / "spec.yaml"
    spec.write_text(f"extends: {ROOT / 'pipelines' / 'mnist.yaml'}\n"
                    f"workspace: {directory / 'workspace'}\n"
                    f"data:\n  source: mnist-idx\n  path: {data}\n  image_shape: [28, 28]\n"
                    f"  schema: {ROOT / 'schemas' / 'mnist28' / 'schema.pbtxt'}\n"
                    f"metadata:\n  sqlite: {directory / 'workspace' / 'metadata.sqlite'}\n"
                    f"components:\n  serving_pusher: {{base_path: {directory / 'workspace' / 'serving'}}}\n")
    return spec


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "conveyor_ml.cli", *args]


def measure_size(size: int, scratch: Path) -> dict:
    directory = scratch / f"n{size}"
    data = write_dataset(directory / "idx", train=size * 6 // 7, test=size - size * 6 // 7)
    spec = write_spec(directory, data)
    ingestion = run_monitored(cli("data", "init", "--spec", str(spec)))
    manifest = json.loads((directory / "workspace" / "data" / "span-1" / "span.json").read_text())
    print(f"{size}: data init {ingestion['wall_s']:.1f}s, peak {ingestion['peak_rss_mb']:.0f} MiB", flush=True)
    pipeline = run_monitored(cli("run", str(spec)))
    print(f"{size}: run {pipeline['wall_s']:.1f}s, peak {pipeline['peak_rss_mb']:.0f} MiB", flush=True)
    # The run's summary: "evaluated: accuracy 0.98 (threshold ...)", or with the Evaluator's reason,
    # "evaluated: blessed — accuracy 0.98 on N eval examples (...)".
    accuracy = re.search(r"evaluated: .*?accuracy ([\d.]+)", pipeline["output"])
    shutil.rmtree(directory)
    return {
        "examples": size,
        "ingestion": {"wall_s": ingestion["wall_s"], "peak_rss_mb": ingestion["peak_rss_mb"],
                      "pipeline_s": manifest["ingestion_seconds"], "examples": manifest["examples"]},
        "run": {k: pipeline[k] for k in ("wall_s", "peak_rss_mb", "components")},
        "eval_accuracy": float(accuracy.group(1)) if accuracy else None,
    }


def baseline_tree(commit: str, scratch: Path, repository: Path = ROOT) -> Path:
    """The commit's code as an importable tree (its components/ and pipelines/ mapped as setup.py does)."""
    tree = scratch / f"baseline-{commit}"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=repository, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    (tree / "conveyor_ml" / "components").symlink_to("../components")
    (tree / "conveyor_ml" / "pipelines").symlink_to("../pipelines")
    return tree


def compare_ingestion(commit: str, examples: int, scratch: Path, repository: Path = ROOT) -> dict:
    """`conveyor data init` of the same IDX data with the baseline commit's code and with this tree's."""
    directory = scratch / "ingestion"
    data = write_dataset(directory / "idx", train=examples * 6 // 7, test=examples - examples * 6 // 7)
    tree = baseline_tree(commit, scratch, repository)
    results = {}
    for name, env, cwd in (("baseline", {"PYTHONPATH": str(tree)}, tree), ("streaming", None, ROOT)):
        spec = write_spec(directory / name, data)
        run = run_monitored(cli("data", "init", "--spec", str(spec)), env=env, cwd=cwd)
        results[name] = {"wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"],
                         "us_per_example": run["wall_s"] / examples * 1e6}
        print(f"ingestion {name}: {run['wall_s']:.1f}s for {examples}", flush=True)
    shutil.rmtree(directory)
    shutil.rmtree(tree)
    return {"commit": commit, "examples": examples, **results,
            "speedup": results["baseline"]["wall_s"] / results["streaming"]["wall_s"]}


def plot(rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["examples"] for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(sizes, [r["ingestion"]["wall_s"] for r in rows], marker="o", label="data init")
    axes[0].plot(sizes, [r["run"]["wall_s"] for r in rows], marker="o", label="conveyor run")
    for name in ("StatisticsGen", "Trainer", "Evaluator", "Quantizer"):
        axes[0].plot(sizes, [r["run"]["components"].get(name, {}).get("seconds", 0) for r in rows], marker=".",
                     linestyle="--", label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="examples", ylabel="seconds", title="Wall time vs data size")
    axes[0].legend(fontsize=7)
    axes[1].plot(sizes, [r["ingestion"]["peak_rss_mb"] / 1024 for r in rows], marker="o", label="data init")
    axes[1].plot(sizes, [r["run"]["peak_rss_mb"] / 1024 for r in rows], marker="o", label="conveyor run")
    axes[1].set(xscale="log", xlabel="examples", ylabel="GiB (all processes)", title="Peak memory vs data size",
                ylim=(0, None))
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "scale.png", dpi=110)
    plt.close(figure)
    return "scale.png"


def markdown(rows: list[dict], comparison: dict | None) -> str:
    def per_example(seconds: float, count: int) -> str:
        return f"{seconds / count * 1e6:.0f} µs"

    lines = ["# Scale benchmark", "",
             "Synthetic 28x28 digits in MNIST's IDX format (`benchmarks/synthetic_mnist.py`), 6/7 train and 1/7 "
             "t10k files, through `conveyor data init` and `conveyor run` of the default pipeline "
             "(`pipelines/mnist.yaml`: 600 training steps, in-memory DirectRunner) with only the data source, "
             "image shape and schema changed. Peak memory is the summed resident memory of every process of the "
             "command (the CLI, Beam workers, the training and serving children), sampled every 0.2 s. "
             "One run per size, on a 2-core machine shared with other work.", "",
             "| examples | data init | per example | peak | conveyor run | peak | eval accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['examples']:,} | {r['ingestion']['wall_s']:.1f} s | "
                     f"{per_example(r['ingestion']['wall_s'], r['examples'])} | "
                     f"{r['ingestion']['peak_rss_mb'] / 1024:.2f} GiB | {r['run']['wall_s']:.1f} s | "
                     f"{r['run']['peak_rss_mb'] / 1024:.2f} GiB | {r['eval_accuracy']} |")
    names = [name for name in rows[-1]["run"]["components"]]
    lines += ["", "Per component (seconds / peak GiB of all processes while it ran):", "",
              "| component | " + " | ".join(f"{r['examples']:,}" for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for name in names:
        cells = []
        for r in rows:
            c = r["run"]["components"].get(name)
            # A node shorter than the 0.2 s sampling interval may have no memory sample.
            peak = f"{c['peak_rss_mb'] / 1024:.2f}" if c and c["peak_rss_mb"] else "—"
            cells.append(f"{c['seconds']:.1f} s / {peak}" if c else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(rows) >= 2:
        small, large = rows[-2], rows[-1]
        ratio = large["run"]["peak_rss_mb"] / small["run"]["peak_rss_mb"]
        lines += ["", f"Peak memory of the run at {large['examples']:,} is {ratio:.2f}x the peak at "
                      f"{small['examples']:,} ({(ratio - 1) * 100:+.0f} %)."]
        data_components = ("ImportExampleGen", "StatisticsGen", "Evaluator", "Quantizer")
        for name in data_components:
            a, b = small["run"]["components"].get(name), large["run"]["components"].get(name)
            if a and b:
                lines.append(f"- {name}: {per_example(a['seconds'], small['examples'])} → "
                             f"{per_example(b['seconds'], large['examples'])} per example")
        lines.append(f"- data init: {per_example(small['ingestion']['wall_s'], small['examples'])} → "
                     f"{per_example(large['ingestion']['wall_s'], large['examples'])} per example")
    if comparison:
        lines += ["", f"Ingestion against commit {comparison['commit']} (whole-source read, one Python "
                      f"serialisation loop, float pixels), `conveyor data init` of the same "
                      f"{comparison['examples']:,} examples:", "",
                  "| code | wall | per example | peak |", "|---|---|---|---|"]
        for name in ("baseline", "streaming"):
            c = comparison[name]
            lines.append(f"| {name} | {c['wall_s']:.1f} s | {c['us_per_example']:.0f} µs | "
                         f"{c['peak_rss_mb'] / 1024:.2f} GiB |")
        lines += ["", f"Speed-up per example: {comparison['speedup']:.1f}x."]
    return "\n".join(lines) + "\n"


def render(results: Path) -> str:
    """Markdown and plot again from a scale.json (e.g. after a change to their layout)."""
    document = json.loads(results.read_text())
    image = plot(document["sizes"])
    return markdown(document["sizes"], document["ingestion_comparison"]) + \
        f"\n![time and memory against size]({image})\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT,
                        help="compare `data init` with this commit's code ('' to skip)")
    parser.add_argument("--baseline-examples", type=int, default=70_000)
    parser.add_argument("--scratch", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--repository", type=Path, default=ROOT, help="the git repository holding the baseline commit")
    args = parser.parse_args(argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="conveyor-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        comparison = compare_ingestion(args.baseline_commit, args.baseline_examples, scratch, args.repository) \
            if args.baseline_commit else None
        rows = [measure_size(size, scratch) for size in args.sizes]
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    image = plot(rows)
    text = markdown(rows, comparison) + f"\n![time and memory against size]({image})\n"
    write_results("scale", {"sizes": rows, "ingestion_comparison": comparison,
                            "minutes": (time.perf_counter() - started) / 60}, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
