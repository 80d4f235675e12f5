"""Thread settings on a busy machine: the image tier's UNet training step alone and beside one busy
process, for several thread settings, in one run.

The workload is the image stages' own step (``params.yaml``: ``images.model``, the students' batch):
a flow-matching regression step of the tier's ``UNetVelocity`` on a 1x8x8 batch (forward, backward,
Adam), the step the teacher and every student take. Each setting runs in a fresh process (OpenMP reads
its environment once, at start-up), first alone, then beside one busy single-thread process (a pure
Python spin loop, the kind of load a researcher's laptop always has), and reports the median
milliseconds per step of ``--steps`` steps after ``--warmup`` warm-up steps.

The ratio that matters is ``beside busy / alone`` within one setting (the goal: at most 2x), and each
setting's alone time against today's default (2 threads, OpenMP's default wait policy). The thread
count is part of a result's bit pattern (summation order), so only settings that keep the stages'
thread count can be adopted without changing committed results; the others are listed to show what
they would buy. Nothing is asserted.

    python benchmarks/bench_contention.py [--steps 15] [--warmup 3] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> (threads, extra environment); the first is today's setting of the image stages
SETTINGS: dict[str, tuple[int, dict[str, str] | None]] = {
    "2 threads, OpenMP default wait policy (before)": (2, {}),
    "2 threads, as the stages set it (the wait policy from the free cores at start)": (2, None),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 threads, GOMP_SPINCOUNT=1000": (2, {"GOMP_SPINCOUNT": "1000"}),
    "2 threads, GOMP_SPINCOUNT=10000": (2, {"GOMP_SPINCOUNT": "10000"}),
    "1 thread, OpenMP default": (1, {}),
    "1 thread, OMP_WAIT_POLICY=PASSIVE": (1, {"OMP_WAIT_POLICY": "PASSIVE"}),
}
BUSY_LOOP = "while True:\n    pass\n"


def child(steps: int, warmup: int) -> dict:
    """Median ms per UNet training step in this process (threads and OpenMP policy from the env)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from marflow_core.unet import UNetVelocity
    from replication.config import load_params
    from replication.registry import section

    params = load_params(ROOT / "params.yaml")
    images, students = section(params, "images"), section(params, "images_students")
    torch.manual_seed(0)
    net = UNetVelocity(images.channels, images.size, images.model)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    shape = (students.batch_size, images.channels, images.size, images.size)
    times = []
    for _ in range(warmup + steps):
        x1, x0 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        t = torch.rand(shape[0], generator=gen)
        tic = time.perf_counter()
        xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
        loss = (net(xt, t) - (x1 - x0)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - tic)
    return {"median_ms": 1e3 * statistics.median(times[warmup:]), "threads": torch.get_num_threads(),
            "batch": shape[0], "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}


def measure(threads: int, extra_env: dict[str, str] | None, steps: int, warmup: int, busy: bool) -> dict:
    """``extra_env`` None: the variables ``replication.stage.thread_environment`` sets, decided when
    the case starts (after the busy process has started), as a stage's runner decides them."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    spinner = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        if spinner is not None:
            time.sleep(0.5)  # the busy process is running before the first step
        if extra_env is None:
            sys.path.insert(0, str(ROOT))
            from replication.stage import free_cores, thread_environment

            env.update(thread_environment(threads, env, free_cores()))
        else:
            env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **extra_env})
        out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps),
                              "--warmup", str(warmup)], env=env, capture_output=True, text=True,
                             check=True).stdout
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="alone/busy pairs per setting (median)")
    parser.add_argument("--settings", type=int, nargs="*", default=None,
                        help="indices into SETTINGS to run (default: all; the first is always run)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps, args.warmup)))
        return {}
    rows = []
    chosen = [n for i, n in enumerate(SETTINGS) if args.settings is None or i == 0 or i in args.settings]
    for name in chosen:
        threads, extra = SETTINGS[name]
        runs = [(measure(threads, extra, args.steps, args.warmup, busy=False),
                 measure(threads, extra, args.steps, args.warmup, busy=True)) for _ in range(args.repeats)]
        alone, busy = runs[-1]
        rows.append({"setting": name, "alone_ms": statistics.median(a["median_ms"] for a, _ in runs),
                     "busy_ms": statistics.median(b["median_ms"] for _, b in runs),
                     "policy_alone": alone["wait_policy"], "policy_busy": busy["wait_policy"]})
        print(f"  {name}: alone {alone['median_ms']:.0f} ms, beside busy {busy['median_ms']:.0f} ms",
              file=sys.stderr)
    before = rows[0]["alone_ms"]
    print(f"UNet training step, batch {alone['batch']}, {os.cpu_count()} cores, median of {args.steps} "
          f"steps after {args.warmup} warm-up, median of {args.repeats} fresh processes per cell")
    print("| setting | wait policy alone / busy | alone ms | beside one busy process ms | busy / alone "
          "| alone / before |")
    print("|:--|:--|--:|--:|--:|--:|")
    for r in rows:
        r["busy_over_alone"] = r["busy_ms"] / r["alone_ms"]
        r["alone_over_before"] = r["alone_ms"] / before
        print(f"| {r['setting']} | {r['policy_alone']} / {r['policy_busy']} | {r['alone_ms']:.0f} | {r['busy_ms']:.0f} | "
              f"{r['busy_over_alone']:.2f}x | {r['alone_over_before']:.2f}x |")
    result = {"rows": rows, "cores": os.cpu_count(), "steps": args.steps}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
