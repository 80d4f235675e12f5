"""Every MA variant's training step beside its pass-count floor, on the image tier's UNet, in one run.

A variant's floor is the sum of the network passes it cannot avoid, each timed on its own in the
same process: the PeRFlow step it extends (window batch, trajectory-matching forward and backward,
Adam), plus, on the ``n = ceil(fraction * B)`` rows the MA term sees,

* finite differences (``hutchinson_fd``, one probe): the student's forward and backward on the
  ``2n`` points ``x`` and ``x + step * e`` (one batch), and one teacher forward for the score;
* Hutchinson by VJP: the student's forward, one vector-Jacobian product with a graph, and the
  backward of ``e . (J^T e)`` (a double backward), and one teacher forward;
* the discrete log-det with the exact ``D x D`` Jacobian: one forward and one backward per Jacobian
  column, i.e. a forward and backward on ``D * n`` rows, and one teacher forward.

``step / floor`` is the overhead of everything else (the Euler sub-step, the log-determinant, the
bookkeeping); the goal is at most 1.25x. Cases run round-robin (``--rounds`` rounds of ``--steps``
steps each, the median over all), so a load change on a shared machine hits every case alike.
Setup from ``params.yaml`` (``images.model``, ``images_students``: batch, K = 4 windows on a window
bank, MA with one sub-step). Nothing is asserted.

    python benchmarks/bench_ma_floor.py [--threads 2] [--rounds 3] [--steps 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "perflow" | "fd" | "vjp" | "discrete"
    fraction: float = 1.0


VARIANTS = (
    Variant("PeRFlow (window bank), the baseline", "perflow"),
    Variant("+MA, finite differences, full batch", "fd"),
    Variant("+MA, finite differences, 1/2 batch", "fd", 0.5),
    Variant("+MA, VJP (double backward), full batch", "vjp"),
    Variant("+MA, VJP (double backward), 1/2 batch", "vjp", 0.5),
    Variant("+MA, discrete log-det (exact Jacobian), 1/8 batch", "discrete", 1 / 8),
    Variant("+MA, discrete log-det (exact Jacobian), 1/32 batch (the tier's setting)", "discrete", 1 / 32),
)


def setup():
    sys.path.insert(0, str(ROOT))
    from replication.config import load_params
    from replication.registry import section

    params = load_params(ROOT / "params.yaml")
    return section(params, "images"), section(params, "images_students")


def timed(fn: Callable[[], None]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def build(args):
    """``{case: zero-argument callable that runs one step or one primitive}`` and the floors' recipes."""
    import torch

    sys.path.insert(0, str(ROOT))
    from marflow_core import DistillationObjective, MAConfig, TimeWindows, VelocityTeacher, WindowBankSampler
    from marflow_core.training import step_generator
    from marflow_core.unet import UNetVelocity

    images, cfg = setup()
    torch.manual_seed(0)
    size, ch, batch = images.size, images.channels, cfg.batch_size
    shape, dim = (ch, size, size), ch * size * size
    student = UNetVelocity(ch, size, images.model)
    teacher_net = UNetVelocity(ch, size, images.model).requires_grad_(False)
    teacher = VelocityTeacher(teacher_net, t_max=cfg.t_max)
    windows = TimeWindows(4)
    n_bank = 4096
    bank = {"x_start": torch.randn(n_bank, *shape), "y_end": torch.randn(n_bank, *shape),
            "k": torch.randint(0, 4, (n_bank,))}
    sampler = WindowBankSampler.from_bank(windows, bank, batch)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    counter = {"step": 0}

    def ma_config(v: Variant) -> MAConfig | None:
        if v.kind == "perflow":
            return None
        if v.kind == "discrete":
            return MAConfig(weight=cfg.ma.weight, substeps=1, solver="euler", logdet="discrete",
                            normalize_by_dim=True, every=1, batch_fraction=v.fraction)
        return replace(cfg.ma, n_probes=1, substeps=1, every=1, logdet="continuous", solver="euler",
                       divergence="hutchinson_fd" if v.kind == "fd" else "hutchinson",
                       batch_fraction=v.fraction)

    def step_fn(v: Variant) -> Callable[[], None]:
        objective = DistillationObjective(sampler, teacher, ma_config(v))

        def run() -> None:
            counter["step"] += 1
            gen = step_generator(0, counter["step"])
            x1 = torch.randn(batch, *shape, generator=gen)
            terms = objective(student, x1, 0, gen)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
        return run

    def inputs(n: int, grad: bool = False):
        x = torch.randn(n, *shape)
        return (x.requires_grad_(True) if grad else x), torch.rand(n)

    def forward_backward(n: int) -> Callable[[], None]:
        def run() -> None:
            x, t = inputs(n)
            student(x, t).square().mean().backward()
        return run

    def teacher_forward(n: int) -> Callable[[], None]:
        def run() -> None:
            x, t = inputs(n)
            with torch.no_grad():
                teacher_net(x, t)
        return run

    def vjp_double_backward(n: int) -> Callable[[], None]:
        def run() -> None:
            x, t = inputs(n, grad=True)
            e = torch.randint(0, 2, x.shape).to(x.dtype) * 2 - 1
            (e_jac,) = torch.autograd.grad(student(x, t), x, grad_outputs=e, create_graph=True)
            (e_jac * e).sum().backward()
        return run

    cases: dict[str, Callable[[], None]] = {v.name: step_fn(v) for v in VARIANTS}
    floors: dict[str, list[str]] = {}
    for v in VARIANTS:
        n = math.ceil(v.fraction * batch)
        if v.kind == "perflow":
            floors[v.name] = [VARIANTS[0].name]
            continue
        if v.kind == "fd":
            passes = (f"student forward+backward, {2 * n} rows", forward_backward(2 * n))
        elif v.kind == "vjp":
            passes = (f"student forward+VJP+double backward, {n} rows", vjp_double_backward(n))
        else:
            passes = (f"student forward+backward, {dim * n} rows (D = {dim} columns x {n})",
                      forward_backward(dim * n))
        score = (f"teacher forward, {n} rows", teacher_forward(n))
        for name, fn in (passes, score):
            cases.setdefault(name, fn)
        floors[v.name] = [VARIANTS[0].name, passes[0], score[0]]
    meta = {"batch": batch, "dim": dim, "threads": torch.get_num_threads(),
            "params_m": sum(p.numel() for p in student.parameters()) / 1e6}
    return cases, floors, meta


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cases, floors, meta = build(args)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, fn in cases.items():  # warm-up
        fn()
    for r in range(args.rounds):
        for name, fn in cases.items():
            times[name].extend(timed(fn) for _ in range(args.steps))
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    base = ms[VARIANTS[0].name]
    print(f"UNet {meta['params_m']:.2f}M params, D = {meta['dim']}, batch {meta['batch']}, threads "
          f"{meta['threads']}, median of {args.rounds} x {args.steps} steps, cases round-robin")
    print("| variant | ms / step | / PeRFlow | floor ms | step / floor | floor's passes |")
    print("|:--|--:|--:|--:|--:|:--|")
    rows = []
    for v in VARIANTS:
        floor = ms[VARIANTS[0].name] + sum(ms[p] for p in floors[v.name][1:])
        row = {"variant": v.name, "ms": ms[v.name], "over_perflow": ms[v.name] / base,
               "floor_ms": floor, "over_floor": ms[v.name] / floor, "floor_passes": floors[v.name]}
        rows.append(row)
        passes = "; ".join(f"{p} ({ms[p]:.0f} ms)" for p in floors[v.name][1:]) or "itself"
        print(f"| {v.name} | {row['ms']:.0f} | {row['over_perflow']:.2f}x | {floor:.0f} | "
              f"**{row['over_floor']:.2f}x** | {passes} |")
    result = {"rows": rows, "primitives_ms": ms, "meta": meta, "rounds": args.rounds, "steps": args.steps}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
