"""Log-density tracking: marflow against facebookresearch ``flow_matching``, side by side in one run.

Both compute ``log p_1(x_1)`` of a flow model by integrating the augmented ODE ``(x, log-det)`` from
``t = 1`` back to ``t = 0`` on the same 32-step grid with the same scheme (Kutta's 3/8-rule RK4:
torchdiffeq's ``rk4``, marflow's ``rk4_38``), in float64, with the same model and inputs:

* exact divergence: ``flow_matching.solver.ODESolver.compute_likelihood(..., exact_divergence=True)``
  (a Python loop of ``D`` backward passes per evaluation) against
  ``marflow_core.flow_with_logdet(..., "exact")`` with its default Jacobian path (``auto``) and, for
  comparison, its batched reverse-mode VJP (``jacobian_method="reverse"``), at ``D = 2, 16, 64``
  (batch 2048 / 1024 / 256) for three fields:
  - a user's own network: a plain ``nn.Sequential`` over ``cat(x, t)``, two hidden SiLU layers of
    width 128 (marflow: forward-mode tangent engine),
  - ``TimeMLP(D, 256, 3)`` (marflow: its hand-propagated ``jacobian``),
  - a small convolutional field on ``1 x h x w`` images (``D = h w``: 1x2, 4x4, 8x8), seen by both
    as a flat ``(B, D)`` field (flow_matching's exact divergence indexes ``v[:, i]``), batch 64;
* Hutchinson divergence (one Rademacher probe, the same probe for both) on images: a small
  convolutional velocity field on ``1 x 16 x 16``.

It reports the largest absolute difference of the log-likelihoods (they agree to round-off) and the
speed ratio ``flow_matching time / marflow time`` (median of ``--repeats``). Nothing is asserted.
Needs the benchmark-only package: ``pip install --no-deps -r benchmarks/requirements.txt``.

    python benchmarks/bench_logdensity.py --threads 1 [--quick] [--json out.json]

``--quick`` (a smoke run, not for numbers): 8 steps, a quarter of each batch, one repeat.
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
    batch_jacobian,
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


class UserMLP(nn.Module):
    """A user's own velocity network: ``nn.Sequential`` over ``cat(x, t)``, two hidden SiLU layers."""

    def __init__(self, dim: int, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return self.net(torch.cat([x, t[:, None]], 1))


class FlatConvField(nn.Module):
    """``ConvField`` (width 16) on ``1 x h x w`` images, called on flat ``x: (B, h w)``."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.conv, self.hw = ConvField(1, 16), (height, width)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x.reshape(-1, 1, *self.hw), t).reshape(x.shape)


IMAGE_SIDES = {2: (1, 2), 16: (4, 4), 64: (8, 8)}


def make_field(kind: str, dim: int) -> nn.Module:
    if kind == "user":
        return UserMLP(dim)
    if kind == "timemlp":
        return TimeMLP(dim, 256, 3)
    if kind == "conv":
        return FlatConvField(*IMAGE_SIDES[dim])
    raise ValueError(f"unknown field kind {kind!r}")


FIELD_LABELS = {"user": "user's nn.Sequential(cat(x, t)), 2x128 SiLU", "timemlp": "TimeMLP(D, 256, 3)",
                "conv": "conv field 3 layers x 16 ch"}


def flow_matching_solver(model: nn.Module):
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(x, torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]))

    return ODESolver(velocity_model=Wrapped(model))


def exact_case(kind: str, dim: int, batch: int, steps: int, warmup: int, repeats: int) -> dict:
    from marflow_core.divergence import jacobian_plan

    torch.manual_seed(0)
    model = make_field(kind, dim).to(F64).requires_grad_(False)
    x1 = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
    solver = flow_matching_solver(model)

    def theirs():
        return solver.compute_likelihood(x_1=x1, log_p0=log_normal, step_size=None, method="rk4",
                                         time_grid=grid, exact_divergence=True)[1]

    def ours(method: str | None = None):
        def run():
            flow = flow_with_logdet(model, x1, uniform_grid(1.0, 0.0, steps, x1), "rk4_38", "exact",
                                    jacobian_method=method)
            return log_normal(flow.x) + flow.logdet
        return run

    ref = theirs()
    diff = float((ref - ours()()).abs().max())
    diff_reverse = float((ref - ours("reverse")()).abs().max())
    t_theirs = timeit(theirs, warmup, repeats)
    t_ours, t_reverse = timeit(ours(), warmup, repeats), timeit(ours("reverse"), warmup, repeats)
    batch_jacobian(model, x1[:4], torch.ones(4, dtype=F64))  # settles the plan on this field
    return {"case": f"exact, D={dim}, {FIELD_LABELS[kind]}", "field": kind, "dim": dim, "batch": batch,
            "path": jacobian_plan(model, x1, torch.ones(batch, dtype=F64)),
            "max_abs_diff": diff, "max_abs_diff_reverse": diff_reverse, "flow_matching_ms": t_theirs,
            "marflow_ms": t_ours, "marflow_reverse_ms": t_reverse, "speedup": t_theirs / t_ours,
            "speedup_reverse": t_theirs / t_reverse}


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


BATCHES = {2: 2048, 16: 1024, 64: 256}
CONV_BATCH = 64


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hutchinson-batch", type=int, default=128)
    parser.add_argument("--fields", default="user,timemlp,conv", help="comma-separated: user, timemlp, conv")
    parser.add_argument("--dims", default="2,16,64")
    parser.add_argument("--quick", action="store_true", help="8 steps, 1/4 batches, 1 repeat (smoke run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = 4 if args.quick else 1
    if args.quick:
        args.steps, args.warmup, args.repeats = 8, 0, 1
    rows = []
    for kind in args.fields.split(","):
        for d in (int(v) for v in args.dims.split(",")):
            batch = (CONV_BATCH if kind == "conv" else BATCHES[d]) // scale
            rows.append(exact_case(kind, d, batch, args.steps, args.warmup, args.repeats))
            print(f"  {rows[-1]['case']}: {rows[-1]['speedup']:.2f}x", flush=True)
    hutch = hutchinson_case(16, args.hutchinson_batch // scale, args.steps, args.warmup, args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float64, {args.steps} steps "
          f"RK4 (3/8 rule), median of {args.repeats}")
    print("| case | batch | marflow path | max abs diff of log p | flow_matching ms | marflow ms | "
          "speed-up | marflow reverse-mode ms | speed-up (reverse) |")
    print("|:--|--:|:--|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} | {r['path']} | {r['max_abs_diff']:.1e} | "
              f"{r['flow_matching_ms']:.1f} | {r['marflow_ms']:.1f} | **{r['speedup']:.2f}x** | "
              f"{r['marflow_reverse_ms']:.1f} | {r['speedup_reverse']:.2f}x |")
    r = hutch
    print(f"| {r['case']} | {r['batch']} | Hutchinson VJP | {r['max_abs_diff']:.1e} | "
          f"{r['flow_matching_ms']:.1f} | {r['marflow_ms']:.1f} | {r['speedup']:.2f}x | | |")
    worst = max(r["max_abs_diff"] for r in rows)
    print(f"largest |log p difference| over the exact cases: {worst:.1e} (float64)")
    rows.append(hutch)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
