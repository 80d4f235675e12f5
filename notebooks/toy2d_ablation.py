# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2-D tier: ablation of the MA regularizer
#
# Which part of the method does the work: trajectory matching only, MA only, both; the log-det of
# the MA term (the sampler's exact discrete log-det vs the continuous `int div v` with the exact,
# Hutchinson-VJP or finite-difference divergence); MA on every window, on the last only, on all but
# the last (window weights scaled so the expected MA weight stays `lambda`); the reflow vs PeRFlow
# backbone. Every MA variant uses its student's `lambda` as selected on the validation seeds
# (`toy2d_test`); every variant is trained on the same test seeds. Beside quality: the training
# cost of one step, counted (FLOPs of matrix products, forward + backward, and the bytes autograd
# saves for the backward pass), so that the table is a pure function of code and params; measured
# wall-clock ratios are in `benchmarks/`. The MA regularizer is a reconstruction (docs/method.md,
# section 4).

# %% tags=["parameters"]
params = None
out_dir = "results/toy2d/ablation"
checkpoint_root = "checkpoints/toy2d_ablation"
test_checkpoints = "checkpoints/toy2d_test"
test_results = "results/toy2d/test"
progress = True

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from replication.notebook import save_figure, save_json, setup_plotting, stage_configs, write_text
from replication.toy2d.ablation import step_cost, variant_students
from replication.toy2d.evaluate import evaluate_student
from replication.toy2d.selection import Selection, score_seeds, tuned_students
from replication.toy2d.sweep import METRICS, aggregate
from replication.toy2d.tier import MAOnlyObjective, build_objective, load_run, make_model, make_teacher, train_student

toy, train_cfg, eval_cfg, sweep, ablation = stage_configs(
    params, ["toy2d", "toy2d_train", "toy2d_eval", "toy2d_sweep", "toy2d_ablation"])
setup_plotting()
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
teacher = make_teacher(toy)
test = json.loads((Path(test_results) / "metrics.json").read_text())
selections = {s["student"]: Selection(**s) for s in test["selected"]}
seeds = sweep.test_seeds[: ablation.n_seeds]
variants = variant_students(ablation, tuned_students(train_cfg, sweep.families, selections))
print(f"selected on validation seeds {test['seeds']['validation']}: "
      + ", ".join(f"{s.student} {s.parameter} = {s.value}" for s in selections.values())
      + f"; ablation on test seeds {seeds}, {eval_cfg.n_samples} samples per run")

# %%
new = {n: v for n, v in variants.items() if not ablation.variants[n].reuses_test_run}
terms = {n: ablation.variants[n].terms for n in new}
trained = score_seeds(new, seeds, toy, eval_cfg, Path(checkpoint_root), train_student, load_run,
                      evaluate_student, teacher, progress, terms)
reused_names = {n: ablation.variants[n].student for n in variants if n not in new}
reused = score_seeds({student: variants[n] for n, student in reused_names.items()}, seeds, toy, eval_cfg,
                     Path(test_checkpoints), lambda *a, **k: None, load_run, evaluate_student, teacher, progress)
by_student = {student: n for n, student in reused_names.items()}
runs = pd.concat([trained, reused.assign(student=reused["student"].map(by_student))], ignore_index=True)
runs = runs.rename(columns={"student": "variant"})

# %%
costs = {}
for name, (cfg, student) in variants.items():
    objective, batch_fn = build_objective(student, cfg, teacher, Path(checkpoint_root) / "cost_pairs",
                                          False, toy.seed)
    if ablation.variants[name].terms == "ma":
        objective = MAOnlyObjective(objective)
    torch.manual_seed(0)
    model = make_model(cfg, toy.device)
    costs[name] = step_cost(objective, model, batch_fn(0, torch.Generator().manual_seed(0)), 0, 0)

# %%
order = list(ablation.variants)
cells = pd.DataFrame(aggregate(runs, sweep.level, keys=("variant", "nfe")))
cells["description"] = cells["variant"].map({n: v.description for n, v in ablation.variants.items()})
for key in ("mflops_per_step", "saved_mib_per_step"):
    cells[key] = cells["variant"].map({n: c[key] for n, c in costs.items()})
base = costs[order[0]]
cells["flops_vs_first"] = cells["mflops_per_step"] / base["mflops_per_step"]
cells = cells.sort_values(["variant", "nfe"], key=lambda s: s.map(order.index) if s.name == "variant" else s)
shown = ["variant", "nfe", "seeds", "kl", "kl_hw", "tv", "tv_hw", "mode_mass_error", "mode_mass_error_hw",
         "folded", "crosses_windows", "status", "mflops_per_step", "saved_mib_per_step", "flops_vs_first"]
display(cells[shown])  # noqa: F821 (notebook builtin)

# %%
grid = sns.catplot(data=cells, x="variant", y="kl", hue="nfe", kind="point", order=order, palette="viridis",
                   height=3.4, aspect=3.0, dodge=0.4, linestyle="none", errorbar=None)
ax = grid.ax
for i, (nfe, cell) in enumerate(cells.groupby("nfe")):
    x = [order.index(v) - 0.2 + 0.4 * i / max(cells["nfe"].nunique() - 1, 1) for v in cell["variant"]]
    ax.errorbar(x, cell["kl"], yerr=cell["kl_hw"], fmt="none", ecolor="grey", alpha=0.6)
ax.set_yscale("log")
ax.tick_params(axis="x", rotation=30)
grid.figure.suptitle(f"2-D ablation: exact KL(q || p) ({len(seeds)} test seeds, 95% t intervals)", y=1.04)
save_figure(grid.figure, out / "ablation.png")
plt.show()

# %%
def fmt(value, hw=None, digits=3):
    if value is None or pd.isna(value):
        return "–"
    return f"{value:.{digits}g}" + (f" ± {hw:.2g}" if hw is not None and not pd.isna(hw) else "")


table = ["| variant | what | NFE | KL | TV | mode-mass error | folded | MFLOPs / step | saved MiB / step |",
         "|:--|:--|--:|--:|--:|--:|--:|--:|--:|"]
for _, c in cells.iterrows():
    mark = "*" if c["crosses_windows"] else ""
    table.append(f"| {c['variant']} | {c['description']} | {c['nfe']}{mark} | {fmt(c['kl'], c['kl_hw'])} | "
                 f"{fmt(c['tv'], c['tv_hw'])} | {fmt(c['mode_mass_error'], c['mode_mass_error_hw'])} | "
                 f"{fmt(c['folded'])} | {fmt(c['mflops_per_step'])} | {fmt(c['saved_mib_per_step'])} |")
write_text("Generated by `notebooks/toy2d_ablation.py` from `metrics.json`; do not edit by hand.\n\n"
           f"Test seeds {seeds}; {eval_cfg.n_samples} samples per run and NFE; mean ± 95% Student-t half-width "
           "over seeds; `*`: fewer steps than windows (outside PeRFlow's design); KL is a lower bound where "
           "`folded` > 0.\n\n" + "\n".join(table) + "\n", out / "summary.md")
keep = [c for c in shown if c not in ("description",)] + [f"{m}_hw" for m in METRICS if f"{m}_hw" not in shown]
save_json({"seeds": seeds, "n_samples": eval_cfg.n_samples, "selected": test["selected"],
           "variants": {n: {"student": v.student, "terms": v.terms, "overrides": v.overrides,
                            "description": v.description} for n, v in ablation.variants.items()},
           "rows": cells[[*dict.fromkeys([*keep, "description"])]].to_dict("records")}, out / "metrics.json")
cells[shown].to_csv(out / "table.csv", index=False, float_format="%.6g")
