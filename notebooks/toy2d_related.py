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
# # 2-D tier: the related few-step methods beside PeRFlow (+ MA)
#
# Local Flow Matching (Xu, Cheng, Xie, arXiv 2410.02548) and flow map matching (Boffi, Albergo,
# Vanden-Eijnden, arXiv 2406.07507), implemented in `marflow_core` (`local_flow.py`, `flow_map.py`) and
# trained by the shared loop with the test table's optimizer, steps, batch size and widths, on the same
# test seeds; scored with the same exact metrics (KL(q || p) with the exact log-density of each sampler,
# mode-mass error for coverage, folded fraction) at the same NFE on the same evaluation noise. The test
# table's PeRFlow students stand beside them: their test-seed runs (`checkpoints/toy2d_test`, loaded,
# not retrained) are scored here again, so every method is paired with them seed by seed. Each related
# method is compared with PeRFlow + MA (the paper's method) by paired t-tests over the seeds, all
# methods x metrics x NFE one Holm family, with the minimum detectable effect (`toy2d_test`'s level and
# power). Beside quality: the counted training cost per step and the counted sampling cost per sample.
# LFM's joint training on the exact OU
# chain is a reconstruction choice (marflow_core/local_flow.py).

# %% tags=["parameters"]
params = None
out_dir = "results/toy2d/related"
checkpoint_root = "checkpoints/toy2d_related"
test_results = "results/toy2d/test"
test_checkpoints = "checkpoints/toy2d_test"
progress = True

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from tqdm.auto import tqdm

from replication.notebook import save_figure, save_json, setup_plotting, stage_configs, write_text
from replication.toy2d.ablation import step_cost
from replication.toy2d.evaluate import evaluate_student
from replication.toy2d.related import (
    METHODS,
    PREREQUISITE,
    batch_fn,
    evaluate_method,
    make_model,
    make_objective,
    sampling_mflops,
    train_method,
)
from replication.toy2d.selection import (
    Selection,
    compare_students,
    score_seeds,
    tuned_students,
    verdict_sentences,
)
from replication.toy2d.sweep import aggregate
from replication.toy2d.tier import load_run, make_teacher

toy, train_cfg, eval_cfg, sweep, test_cfg, related = stage_configs(
    params, ["toy2d", "toy2d_train", "toy2d_eval", "toy2d_sweep", "toy2d_test", "toy2d_related"])
setup_plotting()
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
teacher = make_teacher(toy)
seeds = sweep.test_seeds[: related.n_seeds]
root = Path(checkpoint_root)
print(f"methods {related.methods} on test seeds {seeds}; {train_cfg.steps} steps of batch {train_cfg.batch_size}; "
      f"LFM: {related.chain.n_blocks} blocks, OU steps {related.ou_steps}; {eval_cfg.n_samples} samples per run "
      f"and NFE {eval_cfg.nfe}")

# %%
rows = []
for method in tqdm(related.methods, desc="methods", disable=not progress):
    for seed in seeds:
        model = train_method(method, seed, related, train_cfg, toy, teacher, root, progress=False)
        rows += [{**r, "seed": seed} for r in evaluate_method(method, model, related, teacher, eval_cfg)]
runs = pd.DataFrame(rows)
test = json.loads((Path(test_results) / "metrics.json").read_text())
tuned = tuned_students(train_cfg, sweep.families, {s["student"]: Selection(**s) for s in test["selected"]})
reference_runs = score_seeds({n: tuned[n] for n in related.reference_students}, seeds, toy, eval_cfg,
                             Path(test_checkpoints), lambda *a, **k: None, load_run, evaluate_student, teacher,
                             progress).drop(columns="method")  # its "student" names the run

# %%
costs = {}
for method in related.methods:
    torch.manual_seed(0)
    model = make_model(method, related, train_cfg, toy.device)
    chain = make_model("lfm", related, train_cfg, toy.device).requires_grad_(False) if method == "lfm_distilled" else None
    objective = make_objective(method, related, teacher, chain)
    batch = batch_fn(method, teacher, train_cfg.batch_size)(0, torch.Generator().manual_seed(0))
    costs[method] = {**step_cost(objective, model, batch, 0, 0),
                     **{f"sample_mflops_nfe{n}": sampling_mflops(method, model, related, n) for n in eval_cfg.nfe}}

# %%
cells = pd.DataFrame(aggregate(runs, sweep.level, keys=("method", "nfe")))
cells["sample_mflops"] = [costs[m][f"sample_mflops_nfe{n}"] for m, n in zip(cells["method"], cells["nfe"], strict=True)]
for key in ("mflops_per_step", "saved_mib_per_step"):
    cells[key] = cells["method"].map({m: c[key] for m, c in costs.items()})
cells["needs"] = cells["method"].map(PREREQUISITE)
reference = pd.DataFrame(aggregate(reference_runs.rename(columns={"student": "method"}), sweep.level,
                                   keys=("method", "nfe")))
reference["needs"] = "the teacher"
paired = pd.concat([runs.rename(columns={"method": "student"}), reference_runs], ignore_index=True)
control = "perflow_ma" if "perflow_ma" in related.reference_students else related.reference_students[0]
comparisons = compare_students(paired, [[m, control] for m in related.methods], ["kl", "mode_mass_error"],
                               test_cfg.alpha, test_cfg.power)
sentences = verdict_sentences(comparisons, test_cfg.alpha)
print("\n".join(sentences))
table = pd.concat([cells, reference.assign(source="test-table runs")], ignore_index=True)
table["source"] = table.get("source", pd.Series(dtype=object)).fillna("this stage")
shown = ["method", "nfe", "seeds", "kl", "kl_hw", "tv", "tv_hw", "mode_mass_error", "mode_mass_error_hw",
         "folded", "crosses_windows", "status", "mflops_per_step", "saved_mib_per_step", "sample_mflops", "needs",
         "source"]
display(table[shown])  # noqa: F821 (notebook builtin)

# %%
order = [*related.methods, *related.reference_students]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for ax, (metric, label) in zip(axes, [("kl", "exact KL(q || p)"), ("mode_mass_error", "mode-mass error")],
                               strict=True):
    sns.lineplot(data=table, x="nfe", y=metric, hue="method", hue_order=order, marker="o", ax=ax,
                 palette="tab10", errorbar=None)
    for method, cell in table.groupby("method"):
        ax.fill_between(cell["nfe"], cell[metric] - cell[f"{metric}_hw"], cell[metric] + cell[f"{metric}_hw"],
                        alpha=0.12, color=ax.get_lines()[order.index(method)].get_color())
    ax.set(xscale="log", xlabel="NFE", ylabel=label, xticks=eval_cfg.nfe, xticklabels=eval_cfg.nfe)
    if metric == "kl":
        ax.set_yscale("log")
axes[1].get_legend().remove()
fig.suptitle(f"Related methods vs PeRFlow on the 2-D tier ({len(seeds)} test seeds, 95% t intervals)")
save_figure(fig, out / "related.png")
plt.show()


# %%
def fmt(value, hw=None, digits=3):
    if value is None or pd.isna(value):
        return "–"
    return f"{value:.{digits}g}" + (f" ± {hw:.2g}" if hw is not None and not pd.isna(hw) else "")


lines = ["| method | NFE | KL | TV | mode-mass error | folded | train MFLOPs / step | saved MiB / step | "
         "sample MFLOPs | needs | source |", "|:--|--:|--:|--:|--:|--:|--:|--:|--:|:--|:--|"]
for _, c in table.iterrows():
    mark = "*" if c["crosses_windows"] else ""
    lines.append(f"| {c['method']} | {c['nfe']}{mark} | {fmt(c['kl'], c['kl_hw'])} | {fmt(c['tv'], c['tv_hw'])} | "
                 f"{fmt(c['mode_mass_error'], c['mode_mass_error_hw'])} | {fmt(c['folded'])} | "
                 f"{fmt(c.get('mflops_per_step'))} | {fmt(c.get('saved_mib_per_step'))} | {fmt(c.get('sample_mflops'))} | "
                 f"{c['needs']} | {c['source']} |")
write_text("Generated by `notebooks/toy2d_related.py` from `metrics.json`; do not edit by hand.\n\n"
           f"Test seeds {seeds}; {eval_cfg.n_samples} samples per run and NFE; mean ± 95% Student-t half-width over "
           "seeds; `*`: fewer steps than windows or blocks (outside the method's design); KL is a lower bound where "
           "`folded` > 0. Training cost: counted FLOPs (forward + backward) and autograd-saved MiB of one step; "
           "sampling cost: counted FLOPs per sample. PeRFlow rows: the test table's runs (`checkpoints/toy2d_test`), "
           "scored here on the same seeds and noise; their cost columns are in the ablation "
           "(`results/toy2d/ablation`).\n\n" + "\n".join(lines) + "\n\n"
           f"Each method vs {control}, paired by seed (kl, mode_mass_error):\n\n" + "\n".join(sentences) + "\n",
           out / "summary.md")
save_json({"seeds": seeds, "n_samples": eval_cfg.n_samples, "interval": "95% Student-t half-width over seeds",
           "methods": {m: METHODS[m] for m in related.methods}, "costs": costs,
           "rows": cells.to_dict("records"), "reference_rows": reference.to_dict("records"),
           "control": control, "comparisons": comparisons, "alpha": test_cfg.alpha, "power": test_cfg.power},
          out / "metrics.json")
table[shown].to_csv(out / "table.csv", index=False, float_format="%.6g")
