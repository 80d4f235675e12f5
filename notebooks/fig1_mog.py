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
# # Figure 1 analogue: teacher, PeRFlow and PeRFlow + MA on a 2-D mixture
#
# The paper's Figure 1 (caption only available to us) contrasts a trajectory-matching student, whose
# capacity-limited fit of the conditional mean blurs modes, with a student that also aligns marginals.
# Here the teacher is exact, so every number below is a property of the student.
#
# **How the numbers are computed.** A few-step student is a discrete map `y = S(x0)`. Its log-density
# at its own samples is exact by the change of variables of each Euler step
# (`log q(y) = log N(x0) - sum log|det(I + h J)|`), and the teacher's `log p_1` is closed-form, so
# `KL(q || p) = E_q[log q - log p]` and `TV = E_q[max(0, 1 - p/q)]` are Monte-Carlo means over the
# student's samples (± one standard error). The formula assumes the map is one-to-one. Where a step
# folds space (`det <= 0`, column `folded`), one preimage is kept and the KL and TV shown are
# **lower bounds**; `folded = 0` is necessary for exactness, not sufficient (a map with a positive
# determinant everywhere can still be many-to-one), so sample metrics (mode mass, sliced W2, MMD)
# stand beside the exact ones. With fewer steps than windows
# (`crosses_windows`), the sampler takes uniform steps across window boundaries.
# The MA regularizer is a reconstruction (docs/method.md, section 4), not the paper's code.

# %% tags=["parameters"]
params = None
out_dir = "results/toy2d/fig1_mog"
checkpoint_dir = "checkpoints/toy2d"
progress = True

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from replication.notebook import save_figure, save_json, setup_plotting, stage_configs
from replication.toy2d.evaluate import (
    density_grid,
    eval_noise,
    evaluate_all,
    reference_floor,
    student_paths,
    teacher_paths,
)
from replication.toy2d.tier import load_student, make_teacher

toy, train_cfg, eval_cfg, fig_cfg = stage_configs(
    params, ["toy2d", "toy2d_train", "toy2d_eval", "fig1_mog"])
setup_plotting()
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
teacher = make_teacher(toy)
students = {name: load_student(name, train_cfg, toy, Path(checkpoint_dir))
            for name in train_cfg.students}

# %% [markdown]
# ## Metrics at 1 / 2 / 4 / 8 NFE
# Sample counts: `n_samples` student samples per KL / TV / mode-mass / sliced-W2 estimate,
# `mmd_samples` for the MMD, `tm_eval_batch` for the trajectory-matching loss (printed below).

# %%
table = evaluate_all(students, teacher, eval_cfg)
floor = reference_floor(teacher, eval_cfg)
pd.set_option("display.precision", 4)
show = ["student", "nfe", "kl", "kl_se", "tv", "tv_se", "mode_mass_error", "off_mode",
        "sliced_w2", "mmd2", "folded", "crosses_windows", "tm_loss", "tm_loss_se"]
show += ["status"] if (table.status != "ok").any() else []  # why a row's KL is not a number, in words
print(f"n = {eval_cfg.n_samples} samples (KL, TV, mode mass, sliced W2 with "
      f"{eval_cfg.sw_projections} directions), {eval_cfg.mmd_samples} (MMD), "
      f"{eval_cfg.tm_eval_batch} (TM loss)")
display(table[show])  # noqa: F821
print("noise floor (two independent exact teacher sample sets):", floor)

# %%
kl_wide = table.pivot(index="student", columns="nfe", values="kl")
kl_se_wide = table.pivot(index="student", columns="nfe", values="kl_se")
kl_text = kl_wide.map(lambda v: f"{v:.3f}") + " ± " + kl_se_wide.map(lambda v: f"{v:.3f}")
print("KL(student || teacher) by NFE")
display(kl_text)  # noqa: F821

# %% [markdown]
# ## Samples and trajectories
# Teacher: exact samples and exact ODE trajectories. Students: the `nfe_show`-step sampler from the
# same noise, trajectories drawn through the sampler's intermediate states. Contours: the exact
# teacher density.

# %%
x0 = eval_noise(eval_cfg, fig_cfg.n_show, toy.device)
panels = {"teacher (32-step RK4 ODE)": teacher_paths(teacher, x0, 32).cpu()}
for name in fig_cfg.students:
    panels[f"{name}, {fig_cfg.nfe_show} NFE"] = student_paths(students[name], x0, fig_cfg.nfe_show).cpu()

gx, gy, density, lim = density_grid(teacher)

fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), sharex=True, sharey=True)
for ax, (title, path) in zip(axes, panels.items(), strict=True):
    ax.contour(gx, gy, density, levels=6, colors="0.6", linewidths=0.7)
    k = fig_cfg.n_trajectories
    ax.plot(path[:, :k, 0].numpy(), path[:, :k, 1].numpy(), color="tab:blue", alpha=0.25, lw=0.7)
    ax.scatter(path[-1, :, 0], path[-1, :, 1], s=2, alpha=0.35, color="tab:red", linewidths=0)
    name = title.split(",")[0]
    if name in students:
        row = table[(table.student == name) & (table.nfe == fig_cfg.nfe_show)].iloc[0]
        title += f"\nKL {row.kl:.3f} ± {row.kl_se:.3f}, off-mode {row.off_mode:.1%}"
    else:
        title += "\nreference (KL ~ 0 up to ODE error)"
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
fig.suptitle("2-D mixture: teacher vs trajectory-matching student vs + marginal alignment", y=1.02)
save_figure(fig, out / "fig1_samples.png")
plt.show()

# %% [markdown]
# ## KL and TV against the number of function evaluations

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for ax, metric in zip(axes, ["kl", "tv"], strict=True):
    for name, group in table.groupby("student", sort=False):
        ax.errorbar(group.nfe, group[metric], yerr=group[f"{metric}_se"], marker="o", capsize=3,
                    label=name, ls="--" if "_ma" in name else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(eval_cfg.nfe, [str(n) for n in eval_cfg.nfe])
    ax.set_xlabel("NFE (Euler steps)")
    ax.set_ylabel(f"{metric.upper()}(student, teacher)")
    if metric == "kl":
        ax.set_yscale("log")
axes[0].legend(fontsize=8)
fig.suptitle("Exact divergences of the few-step students (± MC standard error)")
fig.tight_layout()
save_figure(fig, out / "kl_tv_vs_nfe.png")
plt.show()

# %%
save_json({
    "table": table.replace({np.nan: None}).to_dict(orient="records"),
    "noise_floor": floor,
    "n_samples": eval_cfg.n_samples, "mmd_samples": eval_cfg.mmd_samples,
    "tm_eval_batch": eval_cfg.tm_eval_batch,
    "notes": ("KL/TV exact up to Monte-Carlo error; lower bounds where folded > 0; "
              "MA regularizer is a reconstruction (docs/method.md, section 4)"),
}, out / "metrics.json")
