"""Log-density tracking: marflow against facebookresearch ``flow_matching``, side by side in one run.

Both compute ``log p_1(x_1)`` of a flow model by integrating the augmented ODE ``(x, log-det)`` from
``t = 1`` back to ``t = 0`` on the same 32-step grid with the same scheme (Kutta's 3/8-rule RK4:
torchdiffeq's ``rk4``, marflow's ``rk4_38``), in float64, with the same model and inputs:

* ``flow_matching.solver.ODESolver.compute_likelihood(..., exact_divergence=True)`` (a Python loop
  of ``D`` backward passes per evaluation) against ``marflow_core.flow_with_logdet(..., "exact")``
  (``TimeMLP.jacobian``: the exact Jacobian by forward propagation, one GEMM per layer), for a
  ``TimeMLP(D, 256, 3)`` at ``D = 2, 16, 64``;
* Hutchinson divergence (one Rademacher probe, the same probe for both) on images: a small
  convolutional velocity field on ``1 x 16 x 16``.

It reports the largest absolute difference of the log-likelihoods (they agree to round-off) and the
speed ratio ``flow_matching time / marflow time`` (median of ``--repeats``). Nothing is asserted.
Needs the benchmark-only package: ``pip install --no-deps -r benchmarks/requirements.txt``.

    python benchmarks/bench_logdensity.py --threads 1 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from marflow_core import (
    TimeMLP,
    flow_with_logdet,
    hutchinson_divergence,
    odeint_fixed,
    uniform_grid,
)

F64 = torch.float64


def timeit(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def log_normal(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x.flatten(1).pow(2).sum(-1) - 0.5 * x[0].numel() * math.log(2 * math.pi)


class ConvField(nn.Module):
    """A small convolutional velocity field on ``(B, C, H, W)``; time enters as an extra channel."""

    def __init__(self, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels + 1, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return self.net(torch.cat([x, t[:, None, None, None].expand(-1, 1, *x.shape[2:])], 1))


def flow_matching_solver(model: nn.Module):
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(x, torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]))

    return ODESolver(velocity_model=Wrapped(model))


def exact_case(dim: int, batch: int, steps: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = TimeMLP(dim, 256, 3).to(F64).requires_grad_(False)
    x1 = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
    solver = flow_matching_solver(model)

    def theirs():
        return solver.compute_likelihood(x_1=x1, log_p0=log_normal, step_size=None, method="rk4",
                                         time_grid=grid, exact_divergence=True)[1]

    def ours():
        flow = flow_with_logdet(model, x1, uniform_grid(1.0, 0.0, steps, x1), "rk4_38", "exact")
        return log_normal(flow.x) + flow.logdet

    diff = float((theirs() - ours()).abs().max())
    t_theirs, t_ours = timeit(theirs, warmup, repeats), timeit(ours, warmup, repeats)
    return {"case": f"exact, D={dim}", "batch": batch, "max_abs_diff": diff, "flow_matching_ms": t_theirs,
            "marflow_ms": t_ours, "speedup": t_theirs / t_ours}


def hutchinson_case(size: int, batch: int, steps: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = ConvField().to(F64).requires_grad_(False)
    x1 = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(1), dtype=F64)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
    solver = flow_matching_solver(model)

    def theirs():
        torch.manual_seed(7)  # flow_matching draws its probe from the global generator, in the
        default = torch.get_default_dtype()  # default dtype: float64 for this comparison
        torch.set_default_dtype(F64)
        try:
            return solver.compute_likelihood(x_1=x1, log_p0=log_normal, step_size=None, method="rk4",
                                             time_grid=grid, exact_divergence=False)[1]
        finally:
            torch.set_default_dtype(default)

    torch.manual_seed(7)
    probe = ((torch.randn_like(x1) < 0) * 2.0 - 1.0)[None]  # the very same probe, (1, B, C, H, W)

    def ours():
        def dynamics(state, t):
            return hutchinson_divergence(model, state[0], t, probe)

        zero = torch.zeros(batch, dtype=F64)
        x0, logdet = odeint_fixed(dynamics, (x1, zero), uniform_grid(1.0, 0.0, steps, x1), "rk4_38")
        return log_normal(x0) + logdet

    diff = float((theirs() - ours()).abs().max())
    t_theirs, t_ours = timeit(theirs, warmup, repeats), timeit(ours, warmup, repeats)
    return {"case": f"Hutchinson, 1x{size}x{size} conv", "batch": batch, "max_abs_diff": diff,
            "flow_matching_ms": t_theirs, "marflow_ms": t_ours, "speedup": t_theirs / t_ours}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [exact_case(d, args.batch, args.steps, args.warmup, args.repeats) for d in (2, 16, 64)]
    rows.append(hutchinson_case(16, args.batch, args.steps, args.warmup, args.repeats))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float64, {args.steps} steps "
          f"RK4 (3/8 rule), batch {args.batch}, median of {args.repeats}")
    print("| case | max abs diff of log p | flow_matching ms | marflow ms | speed-up |")
    print("|:--|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['case']} | {r['max_abs_diff']:.1e} | {r['flow_matching_ms']:.1f} | "
              f"{r['marflow_ms']:.1f} | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
