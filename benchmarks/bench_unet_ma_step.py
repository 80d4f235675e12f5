"""The image tier's training costs, in one run: MA step vs PeRFlow step (time and peak memory) and the
teacher's pair-generation throughput.

Setup from ``params.yaml`` (``images.model``, ``images_students``): the tier's ``UNetVelocity`` as
student and frozen teacher, its batch, its PeRFlow (K = 4 windows on the window bank, so a PeRFlow
step solves no teacher ODE) and its MA settings with one probe and one sub-step, the divergence by a
VJP (its parameter gradient is a double backward) or by finite differences (``hutchinson_fd``), on
the whole batch or on half of it (``batch_fraction``), or the discrete log-det with the exact
``D x D`` Jacobian on 1/8 or 1/32 of the batch, by the default path (``auto``: forward mode with
``create_graph``, the tangent engine of ``marflow_core.forward_jacobian``) and by the batched
reverse-mode VJP with its double backward (``reverse mode``). An online PeRFlow step (teacher solved over
the window at every step, ``M`` Euler steps) is listed for comparison. One step = window batch,
forward, backward, Adam. Each case runs in a fresh process, so its peak resident memory
(``ru_maxrss``) above the process's state after setup is the step's own. Then the throughput of the
window bank and the reflow pair bank with the tier's solver settings. Nothing is asserted.

    python benchmarks/bench_unet_ma_step.py [--threads 1] [--steps 6] [--size 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("perflow (window bank)", "perflow (online, 2 Euler teacher steps)",
         "+MA, VJP divergence", "+MA, finite-difference divergence",
         "+MA, finite differences, half batch",
         "+MA, discrete log-det (exact D x D Jacobian), 1/8 batch",
         "+MA, discrete log-det (exact D x D Jacobian), 1/32 batch",
         "+MA, discrete log-det (exact D x D Jacobian, reverse mode), 1/8 batch",
         "+MA, discrete log-det (exact D x D Jacobian, reverse mode), 1/32 batch")


def tier_setup(size: int):
    sys.path.insert(0, str(ROOT))
    from replication.config import load_params
    from replication.registry import section

    params = load_params(ROOT / "params.yaml")
    images, students = section(params, "images"), section(params, "images_students")
    return replace(images, size=size), students


def run_case(case: str, steps: int, threads: int, size: int) -> dict:
    import torch

    from marflow_core import (
        DistillationObjective,
        PeRFlowSampler,
        TimeWindows,
        VelocityTeacher,
        WindowBankSampler,
    )
    from marflow_core.training import step_generator
    from marflow_core.unet import UNetVelocity, parameter_count

    torch.set_num_threads(threads)
    images, cfg = tier_setup(size)
    torch.manual_seed(0)
    student = UNetVelocity(images.channels, size, images.model)
    teacher_net = UNetVelocity(images.channels, size, images.model).requires_grad_(False)
    teacher = VelocityTeacher(teacher_net, t_max=cfg.t_max)
    windows, shape = TimeWindows(4), (images.channels, size, size)
    if "online" in case:
        sampler = PeRFlowSampler(windows, teacher_net, teacher_steps=2, solver="euler")
    else:
        n = 4096
        bank = {"x_start": torch.randn(n, *shape), "y_end": torch.randn(n, *shape),
                "k": torch.randint(0, 4, (n,))}
        sampler = WindowBankSampler.from_bank(windows, bank, cfg.batch_size)
    ma = None
    if "discrete" in case:  # the sampler's own log|det(I + h J)|: the exact D x D Jacobian per sub-step
        from marflow_core import MAConfig

        ma = MAConfig(weight=cfg.ma.weight, substeps=1, solver="euler", logdet="discrete",
                      normalize_by_dim=True, every=1, batch_fraction=1 / 8 if "1/8" in case else 1 / 32)
    elif "MA" in case:
        ma = replace(cfg.ma, n_probes=1, substeps=1, every=1,
                     divergence="hutchinson" if "VJP" in case else "hutchinson_fd",
                     batch_fraction=0.5 if "half" in case else 1.0)
    objective = DistillationObjective(sampler, teacher, ma)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    from marflow_core import default_jacobian_method

    jacobian = "reverse" if "reverse mode" in case else "auto"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(steps + 1):  # the first step is a warm-up
        gen = step_generator(0, step)
        x1 = torch.randn(cfg.batch_size, *shape, generator=gen)
        tic = time.perf_counter()
        with default_jacobian_method(jacobian):
            terms = objective(student, x1, step, gen)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
        optimizer.step()
        times.append(time.perf_counter() - tic)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "median_ms": 1e3 * statistics.median(times[1:]),
            "peak_extra_mib": (peak - base) / 1024, "params_m": parameter_count(student) / 1e6,
            "batch": cfg.batch_size}


def discrete_ma_agreement(threads: int, size: int, rows: int = 4) -> dict:
    """The discrete-log-det MA surrogate and its parameter gradient on ``rows`` window rows, by
    forward and by reverse mode: their largest absolute differences (float32 round-off)."""
    import torch

    from marflow_core import MAConfig, VelocityTeacher, default_jacobian_method, ma_surrogate
    from marflow_core.trajectory import WindowBatch
    from marflow_core.unet import UNetVelocity

    torch.set_num_threads(threads)
    images, cfg = tier_setup(size)
    torch.manual_seed(0)
    student = UNetVelocity(images.channels, size, images.model)
    teacher = VelocityTeacher(UNetVelocity(images.channels, size, images.model).requires_grad_(False),
                              t_max=cfg.t_max)
    gen = torch.Generator().manual_seed(3)
    shape = (rows, images.channels, size, size)
    wb = WindowBatch(x_start=torch.randn(shape, generator=gen), y_end=torch.randn(shape, generator=gen),
                     t=torch.full((rows,), 0.3), t_start=torch.full((rows,), 0.25), t_end=torch.full((rows,), 0.5),
                     k=torch.ones(rows, dtype=torch.long))
    ma = MAConfig(weight=1.0, substeps=2, solver="euler", logdet="discrete")
    out = {}
    for method in ("forward", "reverse"):
        with default_jacobian_method(method):
            loss = ma_surrogate(student, teacher, wb, ma)
            grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
        out[method] = (loss.detach(), [g for g in grads if g is not None])
    (lf, gf), (lr, gr) = out["forward"], out["reverse"]
    return {"loss": float(lr), "loss_abs_diff": float((lf - lr).abs()),
            "grad_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(gf, gr, strict=True)),
            "grad_max_abs": max(float(b.abs().max()) for b in gr)}


def throughput(threads: int, size: int, n: int) -> list[dict]:
    """Entries per second of the window bank and the reflow pair bank (tier settings, ``n`` rows)."""
    import tempfile

    import torch

    from marflow_core import TimeWindows, generate_reflow_pairs, generate_window_bank
    from marflow_core.unet import UNetVelocity

    torch.set_num_threads(threads)
    images, cfg = tier_setup(size)
    torch.manual_seed(0)
    teacher = UNetVelocity(images.channels, size, images.model).eval().requires_grad_(False)
    shape = (images.channels, size, size)
    data = torch.rand(512, *shape) * 2 - 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wb = replace(cfg.window_bank, n_entries=n, shard_size=n)
        tic = time.perf_counter()
        generate_window_bank(teacher, data, TimeWindows(4), Path(tmp) / "bank", wb, progress=False)
        rows.append({"bank": f"window bank ({wb.teacher_steps} {wb.solver} steps per window)",
                     "per_second": n / (time.perf_counter() - tic)})
        rp = cfg.reflow_pairs
        tic = time.perf_counter()
        generate_reflow_pairs(teacher, Path(tmp) / "pairs", n, n, shape, steps=rp.steps,
                              method=rp.solver, progress=False)
        rows.append({"bank": f"reflow pairs ({rp.steps} {rp.solver} steps from noise to data)",
                     "per_second": n / (time.perf_counter() - tic)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--bank-rows", type=int, default=1024)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.case:  # child process: one case, JSON on stdout
        print(json.dumps(run_case(args.case, args.steps, args.threads, args.size)))
        return {}
    rows = []
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(args.steps),
                              "--threads", str(args.threads), "--size", str(args.size)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"UNet2DModel {base['params_m']:.2f}M params, 1x{args.size}x{args.size}, batch {base['batch']}, "
          f"threads {args.threads}, median of {args.steps} steps")
    print("| case | ms / step | peak extra MiB | time / PeRFlow | memory / PeRFlow |")
    print("|:--|--:|--:|--:|--:|")
    ratios = {}
    for r in rows:
        ratios[r["case"]] = {"time": r["median_ms"] / base["median_ms"],
                             "peak memory": r["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9)}
        print(f"| {r['case']} | {r['median_ms']:.0f} | {r['peak_extra_mib']:.0f} | "
              f"{ratios[r['case']]['time']:.2f}x | {ratios[r['case']]['peak memory']:.2f}x |")
    agree = discrete_ma_agreement(args.threads, args.size)
    print(f"discrete-log-det MA surrogate (2 sub-steps, 4 rows), forward vs reverse mode: loss "
          f"{agree['loss']:.6g}, |diff| {agree['loss_abs_diff']:.1e}; parameter gradient max |diff| "
          f"{agree['grad_max_abs_diff']:.1e} (max |grad| {agree['grad_max_abs']:.2g}), float32")
    banks = throughput(args.threads, args.size, args.bank_rows)
    print("| bank | rows / s |\n|:--|--:|")
    for b in banks:
        print(f"| {b['bank']} | {b['per_second']:.0f} |")
    result = {"rows": rows, "ratios": ratios, "banks": banks, "discrete_ma_agreement": agree}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
