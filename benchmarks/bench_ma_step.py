"""Cost of the marginal-alignment (MA) term on the 2-D tier, and exact vs Hutchinson divergence.

The setup is read from the tier's config (``--params``, default ``params.yaml``: the active
profile): its mixture teacher, its student architecture, its batch size, and the objectives of its
``perflow`` and ``perflow_ma`` students (window count, teacher solve, MA settings). One run measures
(CPU by default):

* one full training step (sample a window batch, forward, backward, grad clip, Adam) for the tier's
  PeRFlow student, for its PeRFlow + MA student (the tier's MA setting) and for PeRFlow + MA with the
  library's ``MAConfig()`` defaults (continuous log-det, exact trace);
* ``exact_divergence`` vs ``hutchinson_divergence`` (one probe) on the same model, evaluation-only
  (``create_graph=False``) and training-style (``create_graph=True`` plus a backward pass);
* optionally (``--high-dim``, on by default) the same divergence comparison for a ``D = 64``
  ``TimeMLP(64, 256, 3)`` (batch ``--high-dim-batch``), where the exact trace needs ``D``
  vector-Jacobian products and Hutchinson one.

Each timing: ``--warmup`` untimed calls, then the median (and mean) of ``--repeats`` timed calls.
Nothing is asserted; the numbers depend on the machine and its load.

    python benchmarks/bench_ma_step.py [--threads 1] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from marflow_core import (
    DistillationObjective,
    MAConfig,
    TimeMLP,
    exact_divergence,
    hutchinson_divergence,
    sample_probes,
)
from marflow_core.training import step_generator
from replication.config import load_params
from replication.registry import section
from replication.toy2d.tier import build_objective, make_model, make_teacher


def timeit(fn: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return {"median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.fmean(times),
            "min_ms": 1e3 * min(times)}


def training_step_fn(model: nn.Module, objective, teacher, batch: int, lr: float = 1e-3):
    """One step exactly as ``marflow_core.train`` does it (fresh generator per step)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    counter = {"step": 0}

    def step() -> None:
        s = counter["step"]
        gen = step_generator(0, s)
        terms = objective(model, teacher.sample(batch, 1.0, gen), s, gen)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        counter["step"] = s + 1

    return step


def divergence_fns(model: nn.Module, x: torch.Tensor, t: torch.Tensor):
    probes = sample_probes(x, 1, "rademacher", torch.Generator().manual_seed(0))

    def exact_eval():
        exact_divergence(model, x, t)

    def hutch_eval():
        hutchinson_divergence(model, x, t, probes)

    def exact_train():
        _, div = exact_divergence(model, x, t, create_graph=True)
        div.sum().backward()

    def hutch_train():
        _, div = hutchinson_divergence(model, x, t, probes, create_graph=True)
        div.sum().backward()

    return {"exact": exact_eval, "hutchinson": hutch_eval,
            "exact+backward": exact_train, "hutchinson+backward": hutch_train}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the tier's params (active profile)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--high-dim", type=int, default=64, help="D of the extra case; 0 skips it")
    parser.add_argument("--high-dim-batch", type=int, default=128, help="batch of the extra case")
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    params = load_params(args.params)
    toy, train_cfg = section(params, "toy2d"), section(params, "toy2d_train")
    args.batch = train_cfg.batch_size
    teacher = make_teacher(toy)
    plain, _ = build_objective(train_cfg.students["perflow"], train_cfg, teacher, None)
    tier_ma, _ = build_objective(train_cfg.students["perflow_ma"], train_cfg, teacher, None)
    results: dict[str, dict[str, float]] = {}

    cases = [("perflow step", plain), ("perflow+MA step (tier)", tier_ma),
             ("perflow+MA step (MAConfig())", DistillationObjective(plain.sampler, teacher, MAConfig()))]
    for name, objective in cases:
        torch.manual_seed(0)
        model = make_model(train_cfg)
        results[name] = timeit(training_step_fn(model, objective, teacher, args.batch),
                               args.warmup, args.repeats)

    torch.manual_seed(0)
    model = make_model(train_cfg)
    gen = torch.Generator().manual_seed(1)
    x = teacher.sample(args.batch, 0.5, gen)
    t = torch.rand(args.batch, generator=gen)
    for name, fn in divergence_fns(model, x, t).items():
        results[f"D=2 {name}"] = timeit(fn, args.warmup, args.repeats)

    if args.high_dim:
        d = args.high_dim
        torch.manual_seed(0)
        big = TimeMLP(d, 256, 3)
        xd = torch.randn(args.high_dim_batch, d, generator=gen)
        td = torch.rand(args.high_dim_batch, generator=gen)
        for name, fn in divergence_fns(big, xd, td).items():
            results[f"D={d} {name}"] = timeit(fn, args.warmup, args.repeats)

    ratios = {
        "MA step (tier setting) / PeRFlow step": (
            results["perflow+MA step (tier)"]["median_ms"] / results["perflow step"]["median_ms"]),
        "MA step (MAConfig()) / PeRFlow step": (
            results["perflow+MA step (MAConfig())"]["median_ms"] / results["perflow step"]["median_ms"]),
        "D=2 exact / Hutchinson": results["D=2 exact"]["median_ms"] / results["D=2 hutchinson"]["median_ms"],
        "D=2 exact / Hutchinson (+backward)":
            results["D=2 exact+backward"]["median_ms"] / results["D=2 hutchinson+backward"]["median_ms"],
    }
    if args.high_dim:
        d = args.high_dim
        ratios[f"D={d} exact / Hutchinson"] = (
            results[f"D={d} exact"]["median_ms"] / results[f"D={d} hutchinson"]["median_ms"])
        ratios[f"D={d} exact / Hutchinson (+backward)"] = (
            results[f"D={d} exact+backward"]["median_ms"] / results[f"D={d} hutchinson+backward"]["median_ms"])

    print(f"setup from {args.params} (profile {params.get('profile')}): {train_cfg.model}, "
          f"MA {train_cfg.ma}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch} "
          f"(D={args.high_dim} case: {args.high_dim_batch}), warmup {args.warmup}, repeats {args.repeats}")
    print(f"{'case':<38}{'median ms':>12}{'mean ms':>12}{'min ms':>12}")
    for name, r in results.items():
        print(f"{name:<38}{r['median_ms']:>12.2f}{r['mean_ms']:>12.2f}{r['min_ms']:>12.2f}")
    print()
    for name, value in ratios.items():
        print(f"{name:<46}{value:>8.2f}x")
    total = time.perf_counter() - t_start
    print(f"\ntotal benchmark time {total:.1f} s")
    out = {"results": results, "ratios": ratios, "threads": torch.get_num_threads(),
           "batch": args.batch, "high_dim_batch": args.high_dim_batch, "torch": torch.__version__, "total_seconds": total}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
