"""The teacher's window solve: vectorised over per-sample windows vs a Python loop over samples.

PeRFlow draws a window per sample, so every sample needs the teacher ODE over its own
``[t_k, t_{k+1}]``. ``marflow_core`` solves the whole batch at once on a per-sample time grid
``(M + 1, B)`` (``uniform_grid`` + ``odeint_fixed``); the alternative is one solve per sample. Both
use the 2-D tier's exact teacher from ``--params`` and its window solve settings; results agree to
round-off. Nothing is asserted.

    python benchmarks/bench_teacher_solve.py [--threads 1] [--batch 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from marflow_core import TimeWindows, odeint_fixed, uniform_grid
from replication.config import load_params
from replication.registry import section
from replication.toy2d.tier import make_teacher


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    teacher = make_teacher(section(params, "toy2d"))
    train = section(params, "toy2d_train")
    steps, solver = train.perflow.teacher_steps, train.perflow.solver
    windows = TimeWindows(train.students["perflow"].windows)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 2, generator=gen)
    t0, t1 = windows.bounds(windows.sample_times(args.batch, gen, x)[1], x)

    def vectorised():
        return odeint_fixed(teacher, x, uniform_grid(t0, t1, steps, x), solver)

    def loop():
        return torch.cat([odeint_fixed(teacher, x[i:i + 1], uniform_grid(t0[i], t1[i], steps, x), solver)
                          for i in range(args.batch)])

    diff = float((vectorised() - loop()).abs().max())
    timings = {}
    for name, fn in (("vectorised", vectorised), ("loop", loop)):
        fn()
        runs = []
        for _ in range(args.repeats):
            tic = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - tic)
        timings[name] = 1e3 * statistics.median(runs)
    ratio = timings["loop"] / timings["vectorised"]
    print(f"teacher window solve, batch {args.batch}, {steps} {solver} steps per window, "
          f"threads {args.threads}: vectorised {timings['vectorised']:.1f} ms, loop over samples "
          f"{timings['loop']:.1f} ms, speed-up {ratio:.0f}x, max abs diff {diff:.1e}")
    return {**timings, "speedup": ratio, "max_abs_diff": diff}


if __name__ == "__main__":
    main()
