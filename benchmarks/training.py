"""The Trainer's training child at 1 and 2 replicas (MirroredStrategy over logical CPU devices): examples
per second after the first step, first-step time, eval accuracy. Both replicas share this machine's cores;
examples/s counts the global batch (32 per replica), so it shows what the strategy's larger batch costs
per step here, not what a second GPU would add.

Run: make bench (or .venv/bin/python -m benchmarks.training)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import spread, write_results

ROOT = Path(__file__).resolve().parent.parent


def train(data_root: Path, scratch: Path, replicas: int, steps: int, index: int) -> dict:
    from conveyor_ml.components.trainer.training import TrainingJob

    work = scratch / f"r{replicas}-{index}"
    work.mkdir()
    job = TrainingJob(train_files=[str(p) for p in sorted((data_root / "span-1" / "train").iterdir())],
                      eval_files=[str(p) for p in sorted((data_root / "span-1" / "eval").iterdir())],
                      image_shape=(8, 8), serving_model_dir=str(work / "model"), log_dir=str(work / "logs"),
                      facts_path=str(work / "facts.json"), cpu_replicas=replicas, train_steps=steps)
    job.save(work / "job.json")
    result = subprocess.run([sys.executable, "-m", "conveyor_ml.components.trainer.training", str(work / "job.json")],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    return json.loads((work / "facts.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    from conveyor_ml.data.datasets import init_data

    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as scratch:
        data_root = Path(scratch) / "data"
        init_data("sklearn-digits", None, (8, 8), data_root, 0.2)
        for index in range(args.repeats):
            for replicas in (1, 2):
                facts = train(data_root, Path(scratch), replicas, args.steps, index)
                results[replicas].append(facts)
                print(f"{replicas} replica(s): {facts['examples_per_second']:.0f} examples/s, "
                      f"accuracy {facts['eval_accuracy']:.4f}", flush=True)
    figures = {r: {key: spread([f[key] for f in runs]) for key in
                   ("examples_per_second", "eval_accuracy", "wall_time_s", "first_step_s", "global_batch_size")}
               for r, runs in results.items()}
    rows = "\n".join(
        f"| {r} | {f['global_batch_size']['median']:.0f} | {f['examples_per_second']['median']:,.0f} "
        f"({f['examples_per_second']['min']:,.0f}–{f['examples_per_second']['max']:,.0f}) | "
        f"{f['first_step_s']['median']:.1f} s | {f['wall_time_s']['median']:.1f} s | {f['eval_accuracy']['median']:.4f} |"
        for r, f in figures.items())
    markdown = ("# Training benchmark\n\n" + __doc__.split("\n\n")[0] + f"\n\n{args.steps} steps, per-replica batch 32, "
                f"{args.repeats} runs each; medians (min–max).\n\n"
                "| replicas | global batch | examples/s | first step | wall time | eval accuracy |\n|---|---|---|---|---|---|\n"
                + rows + "\n")
    write_results("training", {"steps": args.steps, "figures": {str(k): v for k, v in figures.items()}}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
