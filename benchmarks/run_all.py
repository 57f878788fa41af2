"""`make bench`: every benchmark in turn (each its own process), then the plots and
benchmarks/results/README.md summarising them with the machine they ran on.

The pipeline benchmark runs first and leaves nothing behind; the serving and hot-swap benchmarks use the
model `make pipeline` pushed to workspace/serving (run here first when missing)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine

ROOT = Path(__file__).resolve().parent.parent
STEPS = [
    ("pipeline", ["--cold", "2", "--cached", "3"]),
    ("training", ["--repeats", "3"]),
    ("quantization", ["--repeats", "3"]),
    ("serving", ["--seconds", "3", "--repeats", "3"]),
    ("hot_swap", ["--swaps", "3"]),
    ("lineage", ["--runs", "200"]),
    ("release_reliability", []),  # 300 SIGKILLs of releases, every CLI mistake
    ("server_reliability", []),  # the model server under a hostile corpus and overload
    ("connection_flood", []),  # 20,000 stalled connections to each listener, bounded and not
    ("scale", []),  # 10k, 100k and 1M examples end to end: the longest by far
]
RESULT_FILE = {"release_reliability": "reliability", "server_reliability": "reliability",
               "connection_flood": "reliability"}  # one file, three sections


def plots() -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    serving = json.loads((RESULTS / "serving.json").read_text())
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, dict[int, dict]] = {}
    for key, figures in serving["results"].items():
        name, concurrency = key.split("|")
        series.setdefault(name, {})[int(concurrency)] = figures
    for name, points in series.items():
        levels = sorted(points)
        axes[0].plot(levels, [points[c]["p99_ms"]["median"] for c in levels], marker="o", label=name)
        axes[1].plot(levels, [points[c]["qps"]["median"] for c in levels], marker="o", label=name)
    axes[0].set(xlabel="concurrent clients", ylabel="P99 latency (ms)", title="P99 latency vs concurrency", xscale="log")
    axes[1].set(xlabel="concurrent clients", ylabel="requests/s", title="Throughput vs concurrency", xscale="log")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "serving.png", dpi=110)
    made.append("serving.png")

    quantization = json.loads((RESULTS / "quantization.json").read_text())
    rows = [r for r in quantization["variants"] if r.get("status") == "ok"]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["variant"] for r in rows]
    axes[0].bar(names, [r["size_bytes"] / 2**20 for r in rows])
    axes[0].set(title="size (MiB)")
    axes[1].bar(names, [r["accuracy"] for r in rows])
    axes[1].set(title="accuracy", ylim=(min(r["accuracy"] for r in rows) - 0.02, 1.0))
    axes[2].bar(names, [r["latency_p50_ms"] * 1000 for r in rows])
    axes[2].set(title="p50 latency, batch 1 (µs)")
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(RESULTS / "quantization.png", dpi=110)
    made.append("quantization.png")
    plt.close("all")
    if (RESULTS / "scale.png").is_file():
        made.append("scale.png")  # drawn by benchmarks/scale.py itself
    return made


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=[name for name, _ in STEPS],
                        help="run these benchmarks; the README still summarises every result file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if not (ROOT / "workspace" / "serving" / "mnist").is_dir():
        subprocess.run([sys.executable, "-m", "conveyor_ml.cli", "run"], cwd=ROOT, check=True)
    durations = {}
    for name, arguments in STEPS:
        if args.only and name not in args.only:
            continue
        print(f"== benchmark {name}", flush=True)
        step_started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *arguments], cwd=ROOT)
        durations[name] = time.perf_counter() - step_started
        if result.returncode != 0:
            print(f"benchmark {name} failed (exit {result.returncode})", file=sys.stderr)
            return result.returncode
    images = plots()
    info = machine()
    total = time.perf_counter() - started
    sections = []
    summarised = set()
    for name, _ in STEPS:
        result = RESULT_FILE.get(name, name)
        if result in summarised:
            continue
        summarised.add(result)
        text = (RESULTS / f"{result}.md").read_text().split("\n", 1)[1].strip()
        steps = [step for step, _ in STEPS if RESULT_FILE.get(step, step) == result]
        took = (f"{sum(durations[step] for step in steps):.0f} s" if all(step in durations for step in steps)
                else "from an earlier run")
        sections.append(f"## {result.replace('_', ' ').capitalize()} ([{result}.md]({result}.md), {took})\n\n{text}")
    readme = (
        "# Benchmark results\n\n"
        f"`make bench` on {info['date']}: {info['cores']} cores ({info['cpu']}), {info['system']}, Python "
        f"{info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()) +
        f". This run took {total / 60:.1f} minutes. Figures are medians with min–max over repeated runs.\n\n"
        + "".join(f"![{image}]({image})\n\n" for image in images) + "\n\n".join(sections) + "\n")
    (RESULTS / "README.md").write_text(readme)
    print(f"wrote {RESULTS / 'README.md'} ({total / 60:.1f} minutes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
