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
# # The telescoping total-variation bound, term by term
#
# docs/method.md, section 5: with `Q_k` the student's marginal after `k` windows from `Q_0 = P_0 = N(0, I)`
# and `P_k = p^T_{t_k}`,
# `TV(Q_K, P_K) <= sum_k TV(q_{k+1}, P_{k+1}) <= sum_k sqrt(R_k / 2)`, where `q_{k+1}` is the
# student's window map applied to the *teacher's* marginal `P_k` and `R_k = KL(q_{k+1} || P_{k+1})`.
# The bound compares the student with the teacher, not with data.
#
# Every term is computed on the exact tier:
# * **sampler** (the few-step student, `steps_per_window` Euler steps per window): final TV and local
#   TV / KL exactly by change of variables (lower bounds where a step folds);
# * **student ODE**: `R_k` from the MA value estimator (A), `E int [-div delta - s_T . delta] ds` with
#   `delta = v_student - v_teacher`, integrated with `ode_substeps` RK4 steps per window; and, for
#   comparison, the exact local KL and the final TV of a fine Euler discretisation of the same ODE
#   (`ode_euler_steps` per window). The MA regularizer is a reconstruction.

# %% tags=["parameters"]
params = None
out_dir = "results/toy2d/tv_bound"
checkpoint_dir = "checkpoints/toy2d"
progress = True

# %%
from dataclasses import asdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from replication.notebook import save_figure, save_json, setup_plotting, stage_configs
from replication.toy2d.metrics import as_row
from replication.toy2d.tier import load_student, make_teacher
from replication.toy2d.tv_bound import tv_bound

toy, train_cfg, eval_cfg, tv_cfg = stage_configs(params, ["toy2d", "toy2d_train", "toy2d_eval", "tv_bound"])
setup_plotting()
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
teacher = make_teacher(toy)

# %%
bounds = [tv_bound(load_student(name, train_cfg, toy, Path(checkpoint_dir)), teacher,
                   tv_cfg, eval_cfg.seed) for name in tv_cfg.students]
windows_table = pd.DataFrame([as_row(student=b.student, **{k: v for k, v in vars(w).items()})
                              for b in bounds for w in b.windows])
summary = pd.DataFrame([as_row(student=b.student, final_tv=b.final_tv, sum_local_tv=b.sum_local_tv,
                               pinsker_local_kl=b.pinsker_local_kl, ode_final_tv=b.ode_final_tv,
                               pinsker_estimator_a=b.pinsker_estimator_a) for b in bounds])
print(f"n = {tv_cfg.n_samples} samples per window and for the final TV; sampler: "
      f"{tv_cfg.steps_per_window} Euler step(s) per window; student ODE: estimator (A) with "
      f"{tv_cfg.ode_substeps} RK4 steps, fine map with {tv_cfg.ode_euler_steps} Euler steps per window")
display(windows_table)  # noqa: F821
display(summary)  # noqa: F821

# %% [markdown]
# ## Does each inequality hold?
# Checked with a slack of two combined standard errors of the two sides (every term is a
# Monte-Carlo estimate; a Pinsker term's error is propagated from its KL's). The two sampler
# inequalities hold for any student (data processing and Pinsker, term by term); the ODE one compares
# a fine Euler map with estimator (A) of the continuous ODE, so it also carries discretisation error.

# %%
checks = pd.DataFrame([{"student": b.student, **asdict(c), "holds": c.holds}
                       for b in bounds for c in b.checks])
display(checks)  # noqa: F821

# %%
fig, axes = plt.subplots(1, len(bounds), figsize=(5.2 * len(bounds), 4.2), sharey=True, squeeze=False)
for ax, b in zip(axes[0], bounds, strict=True):
    ax.bar(0, b.final_tv.value, yerr=2 * b.final_tv.stderr, color="tab:blue", capsize=3)
    bottom = 0.0
    colors = plt.cm.Oranges(np.linspace(0.35, 0.85, len(b.windows)))
    for w, c in zip(b.windows, colors, strict=True):
        ax.bar(1, w.local_tv.value, bottom=bottom, color=c, edgecolor="white", label=f"window {w.window}")
        bottom += w.local_tv.value
    ax.bar(2, b.pinsker_local_kl.value, yerr=2 * b.pinsker_local_kl.stderr, color="tab:green", capsize=3)
    ax.bar(3, b.ode_final_tv.value, yerr=2 * b.ode_final_tv.stderr, color="tab:purple", capsize=3)
    ax.bar(4, b.pinsker_estimator_a.value, yerr=2 * b.pinsker_estimator_a.stderr, color="tab:red",
           capsize=3)
    ax.set_xticks(range(5), ["final TV\n(sampler)", "sum local TV\n(sampler)", "sum sqrt(KL_k/2)\n(sampler)",
                             "final TV\n(ODE)", "sum sqrt(R_k/2)\n(estimator A)"], fontsize=8)
    ax.set_title(f"{b.student} (n = {tv_cfg.n_samples})")
    ax.legend(fontsize=7, loc="upper left")
    ax.axvline(2.5, color="0.3", lw=0.8, ls=":")
axes[0][0].set_ylabel("total variation")
fig.suptitle("Telescoping bound. Sampler: final TV <= sum local TV <= sum sqrt(KL_k/2);  "
             "student ODE: final TV <= sum sqrt(R_k/2)", y=1.02, fontsize=11)
fig.tight_layout()
save_figure(fig, out / "tv_bound.png")
plt.show()

# %%
save_json({"windows": windows_table.to_dict(orient="records"),
           "summary": summary.to_dict(orient="records"),
           "checks": checks.to_dict(orient="records"), "n_samples": tv_cfg.n_samples},
          out / "metrics.json")
