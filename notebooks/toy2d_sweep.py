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
# # 2-D tier: one sensitivity sweep family
#
# One setting of one student is varied over a grid; every point is trained from scratch on each
# **validation** seed (the reported test table and the ablation use other seeds) and scored with the
# exact metrics of the 2-D tier: `KL(q || p)` (mode-seeking), TV, the mode-mass error (coverage) and
# the fraction of samples where a sampler step folds space (`det(I + hJ) <= 0`; there the KL is a
# lower bound). Each cell is the mean over seeds with a Student-t interval. The MA regularizer is a
# reconstruction (docs/method.md, section 4).

# %% tags=["parameters"]
params = None
out_dir = "results/toy2d/sweep"
checkpoint_root = "checkpoints/toy2d_sweep"
progress = True

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from replication.notebook import save_figure, save_json, setup_plotting, stage_configs
from replication.toy2d.evaluate import evaluate_student
from replication.toy2d.sweep import family_metrics, family_points, point_settings, run_family
from replication.toy2d.tier import load_run, make_teacher, train_student

toy, train_cfg, eval_cfg, sweep = stage_configs(params, ["toy2d", "toy2d_train", "toy2d_eval", "toy2d_sweep"])
((family_name, family),) = sweep.families.items()
setup_plotting()
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
checkpoints = Path(checkpoint_root) / family_name
print(f"family {family_name}: {family.parameter} of {family.student} over {family.values}; "
      f"validation seeds {sweep.validation_seeds}; {sweep.n_samples} samples per run and NFE")
display(pd.DataFrame([point_settings(p) for p in  # noqa: F821 (notebook builtin)
                      family_points(family, train_cfg, f"toy2d_sweep.families.{family_name}")]))

# %%
runs = run_family(family_name, family, sweep, toy, train_cfg, eval_cfg, checkpoints, train_student,
                  load_run, evaluate_student, make_teacher(toy), progress)
metrics = family_metrics(family_name, family, sweep, runs)
cells = pd.DataFrame(metrics["rows"])
display(cells)  # noqa: F821

# %% [markdown]
# ## Metric against value, one line per NFE
# Shaded: the Student-t interval over the validation seeds. The dashed lines are the no-MA twins
# where the family trains them.

# %%
colors = dict(zip(sorted(cells["nfe"].unique()), sns.color_palette("viridis", cells["nfe"].nunique())))
long = cells.melt(id_vars=["value", "ma", "nfe"], value_vars=["kl", "tv", "mode_mass_error", "folded"],
                  var_name="metric", value_name="mean")
grid = sns.relplot(data=long, x="value", y="mean", hue="nfe", style="ma", col="metric", kind="line",
                   marker="o", palette=colors, facet_kws={"sharey": False}, height=3.0, aspect=1.1,
                   errorbar=None, style_order=[True, False])
for ax, metric in zip(grid.axes.flat, ["kl", "tv", "mode_mass_error", "folded"], strict=True):
    for (nfe, ma), cell in cells.groupby(["nfe", "ma"]):
        if cell[f"{metric}_hw"].notna().any():
            ax.fill_between(cell["value"], cell[metric] - cell[f"{metric}_hw"],
                            cell[metric] + cell[f"{metric}_hw"], color=colors[nfe], alpha=0.15)
grid.set_titles("{col_name}")
grid.figure.suptitle(f"{family_name}: {family.parameter} of {family.student} "
                     f"({len(sweep.validation_seeds)} validation seeds, {sweep.n_samples} samples)", y=1.05)
save_figure(grid.figure, out / "curves.png")
plt.show()

# %%
save_json(metrics, out / "metrics.json")
cells[["value", "ma", "nfe", "seeds", "kl", "kl_hw", "tv", "mode_mass_error", "folded"]].to_csv(
    out / "curve.csv", index=False, float_format="%.6g")
