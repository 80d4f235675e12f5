"""Wall-clock cost of one training step of every 2-D ablation variant, as ratios to the first.

The ablation table (``results/toy2d/ablation``) carries counted costs (FLOPs of matrix products and
autograd-saved bytes per step), which are reproducible; this benchmark measures what they stand for:
the median time of a full training step (window batch, forward, backward, grad clip, Adam) of each
variant of ``toy2d_ablation.variants``, in one run, side by side, and its ratio to the first variant
(trajectory matching only), next to the counted FLOP ratio. MA variants use their student's
selected ``lambda`` from ``results/toy2d/test/metrics.json`` when it exists (else params.yaml's).
Nothing is asserted; times depend on the machine and its load.

    python benchmarks/bench_ablation_cost.py [--threads 1] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from bench_ma_step import timeit, training_step_fn

from replication.config import load_params
from replication.registry import section
from replication.toy2d.ablation import step_cost, variant_students
from replication.toy2d.selection import Selection, tuned_students
from replication.toy2d.tier import MAOnlyObjective, build_objective, make_model, make_teacher


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--selection", default="results/toy2d/test/metrics.json")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(Path(args.params))
    toy, train = section(params, "toy2d"), section(params, "toy2d_train")
    sweep, ablation = section(params, "toy2d_sweep"), section(params, "toy2d_ablation")
    selection_file = Path(args.selection)
    selected = json.loads(selection_file.read_text())["selected"] if selection_file.exists() else []
    selections = {s["student"]: Selection(**s) for s in selected}
    variants = variant_students(ablation, tuned_students(train, sweep.families, selections))
    teacher = make_teacher(toy)
    results = {}
    with tempfile.TemporaryDirectory() as pairs:
        for name, (cfg, student) in variants.items():
            objective, batch_fn = build_objective(student, cfg, teacher, Path(pairs), False, toy.seed)
            if ablation.variants[name].terms == "ma":
                objective = MAOnlyObjective(objective)
            torch.manual_seed(0)
            model = make_model(cfg)
            counted = step_cost(objective, model, batch_fn(0, torch.Generator().manual_seed(0)), 0, 0)
            timing = timeit(training_step_fn(model, objective, teacher, cfg.batch_size), args.warmup, args.repeats)
            results[name] = {**timing, **counted}
    first = next(iter(results.values()))
    print(f"{'variant':<18} {'median ms':>10} {'time ratio':>10} {'FLOP ratio':>10} {'saved MiB':>10}")
    for name, r in results.items():
        r["time_ratio"] = r["median_ms"] / first["median_ms"]
        r["flop_ratio"] = r["mflops_per_step"] / first["mflops_per_step"]
        print(f"{name:<18} {r['median_ms']:>10.2f} {r['time_ratio']:>10.2f} {r['flop_ratio']:>10.2f} "
              f"{r['saved_mib_per_step']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
