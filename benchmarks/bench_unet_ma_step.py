"""MA training step vs PeRFlow training step for a small UNet, time and peak memory, in one run.

Student and frozen teacher: a 0.70M-parameter diffusers ``UNet2DModel`` (``benchmarks/unet_setup.py``)
on ``1 x 8 x 8``, batch 128; PeRFlow with K = 4 windows and a 2-step Euler teacher solve per window;
MA with one Hutchinson probe, one sub-step, the continuous log-det, its divergence either by a VJP
(the parameter gradient is a double backward) or by finite differences (``hutchinson_fd``, step
1e-3, first-order backward only). One full
step = window batch, forward, backward, Adam. Each case runs in its own fresh process, so its peak
resident memory (``ru_maxrss``) above the process's state after setup is the step's own. Nothing is
asserted; the ratios are the point.

    python benchmarks/bench_unet_ma_step.py [--threads 1] [--steps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("perflow", "perflow+MA (1 probe, VJP)", "perflow+MA (1 probe, finite differences)")


def run_case(case: str, steps: int, threads: int, batch: int) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from unet_setup import UNetVelocity

    from marflow_core import (
        DistillationObjective,
        MAConfig,
        PeRFlowSampler,
        TimeWindows,
        VelocityTeacher,
    )
    from marflow_core.training import step_generator

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student, teacher_net = UNetVelocity(), UNetVelocity().requires_grad_(False)
    teacher = VelocityTeacher(teacher_net, t_max=0.99)
    sampler = PeRFlowSampler(TimeWindows(4), teacher_net, teacher_steps=2, solver="euler")
    kind = "hutchinson_fd" if "finite" in case else "hutchinson"
    ma = MAConfig(weight=0.1, substeps=1, divergence=kind, n_probes=1) if "MA" in case else None
    objective = DistillationObjective(sampler, teacher, ma)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(steps + 1):  # the first step is a warm-up
        gen = step_generator(0, step)
        x1 = torch.randn(batch, 1, 8, 8, generator=gen)
        tic = time.perf_counter()
        terms = objective(student, x1, step, gen)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        times.append(time.perf_counter() - tic)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "median_ms": 1e3 * statistics.median(times[1:]),
            "peak_extra_mib": (peak - base) / 1024, "params_m": sum(p.numel() for p in student.parameters()) / 1e6}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.case:  # child process: one case, JSON on stdout
        print(json.dumps(run_case(args.case, args.steps, args.threads, args.batch)))
        return []
    rows = []
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(args.steps),
                              "--threads", str(args.threads), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"UNet2DModel {base['params_m']:.2f}M params, 1x8x8, batch {args.batch}, threads {args.threads}, "
          f"median of {args.steps} steps")
    print("| case | ms / step | peak extra MiB |")
    print("|:--|--:|--:|")
    for r in rows:
        print(f"| {r['case']} | {r['median_ms']:.0f} | {r['peak_extra_mib']:.0f} |")
    ratios = {}
    for ma in rows[1:]:
        ratios[ma["case"]] = {"time": ma["median_ms"] / base["median_ms"],
                              "peak memory": ma["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9)}
        print(f"{ma['case']} / PeRFlow step: time {ratios[ma['case']]['time']:.2f}x, "
              f"peak memory {ratios[ma['case']]['peak memory']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=1))
    return rows


if __name__ == "__main__":
    main()
