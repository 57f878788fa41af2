"""Hot swap under load: a new version lands in the base path (atomic rename, as the pusher does) while
clients send requests; measured: seconds from the rename to the first answer by the new version, and
errors during the swap. The server polls the file system every second (its default).

Run: make bench (or .venv/bin/python -m benchmarks.hot_swap). Needs a pushed model (make pipeline)."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import spread, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-path", default="workspace/serving")
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)
    import requests

    from conveyor_ml.base.server_process import ServerProcess
    from conveyor_ml.formats.release_state import versions_on_disk

    source_versions = versions_on_disk(Path(args.base_path) / args.model)
    if not source_versions:
        print(f"benchmarks.hot_swap: nothing pushed under {args.base_path}; run `make pipeline` first", file=sys.stderr)
        return 2
    source = source_versions[max(source_versions)]
    swaps, errors_total, requests_total = [], 0, 0
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / args.model
        shutil.copytree(source, model_dir / "1")
        server = ServerProcess("--model_name", args.model, "--model_base_path", str(model_dir))
        server.wait_available(args.model)
        url = f"{server.rest_url}/v1/models/{args.model}:predict"
        body = {"instances": [[[7.0] * 8] * 8]}
        state = {"stop": False, "errors": 0, "requests": 0, "seen": {}}
        lock = threading.Lock()

        def client() -> None:
            session = requests.Session()
            while not state["stop"]:
                try:
                    response = session.post(url, json=body, timeout=10)
                    version = int(response.headers.get("X-Model-Version", 0))
                    ok = response.status_code == 200
                except requests.RequestException:
                    ok, version = False, 0
                with lock:
                    state["requests"] += 1
                    state["errors"] += 0 if ok else 1
                    if ok and version not in state["seen"]:
                        state["seen"][version] = time.perf_counter()

        workers = [threading.Thread(target=client) for _ in range(args.clients)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(2)
            for version in range(2, args.swaps + 2):
                staging = model_dir / f".{version}.tmp"
                shutil.copytree(source, staging)
                with lock:
                    errors_before, requests_before = state["errors"], state["requests"]
                landed = time.perf_counter()
                os.rename(staging, model_dir / str(version))
                deadline = landed + 60
                while version not in state["seen"] and time.perf_counter() < deadline:
                    time.sleep(0.01)
                time.sleep(1.5)  # the old version unloads after the new one serves; errors then would count too
                with lock:
                    swaps.append({"version": version, "seconds_to_serve": state["seen"].get(version, float("nan")) - landed,
                                  "errors": state["errors"] - errors_before,
                                  "requests": state["requests"] - requests_before})
                print(f"version {version}: served after {swaps[-1]['seconds_to_serve']:.2f}s, "
                      f"{swaps[-1]['errors']} errors in {swaps[-1]['requests']} requests", flush=True)
        finally:
            state["stop"] = True
            for worker in workers:
                worker.join()
            server.stop()
        errors_total, requests_total = state["errors"], state["requests"]
    figure = spread([s["seconds_to_serve"] for s in swaps])
    markdown = ("# Hot swap benchmark\n\n" + __doc__.split("\n\n")[0] + f"\n\n{args.swaps} swaps with {args.clients} "
                "closed-loop REST clients.\n\n| figure | value |\n|---|---|\n"
                f"| rename to first answer by the new version | {figure['median']:.2f} s median "
                f"({figure['min']:.2f}–{figure['max']:.2f} s) |\n"
                f"| errors during the swaps | {sum(s['errors'] for s in swaps)} of {sum(s['requests'] for s in swaps)} requests |\n"
                f"| errors over the whole run | {errors_total} of {requests_total} requests |\n")
    write_results("hot_swap", {"swaps": swaps, "seconds_to_serve": figure, "errors": errors_total,
                               "requests": requests_total}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
