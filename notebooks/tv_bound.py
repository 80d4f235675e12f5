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
# METHOD.md section 5: with `Q_k` the student's marginal after `k` windows from `Q_0 = P_0 = N(0, I)`
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
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from marflow_core import ma_value_estimate
from replication.notebook import save_figure, save_json, setup_plotting, stage_configs
from replication.toy2d.metrics import kl_tv, mc_mean, sampler_densities, window_densities
from replication.toy2d.tier import load_student, make_teacher

toy, train_cfg, eval_cfg, tv_cfg = stage_configs(params, ["toy2d", "toy2d_train", "toy2d_eval", "tv_bound"])
setup_plotting()
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
teacher = make_teacher(toy)
ckpt = Path(checkpoint_dir)
n = tv_cfg.n_samples


def sampler_divergences(student, n_steps, x0):
    """Exact KL / TV of the student's n-step Euler sampler from x0 against the teacher's p_1."""
    dens = sampler_densities(student.model, student.windows, n_steps, x0, teacher)
    return kl_tv(dens.log_q, dens.log_p)

# %%
window_rows, summary_rows = [], []
for name in tv_cfg.students:
    student = load_student(name, train_cfg, ckpt, device=toy.device)
    bounds = student.windows.boundaries().tolist()
    for k, (ta, tb) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        gen = torch.Generator().manual_seed(eval_cfg.seed + 10 + k)
        local = window_densities(student.model, teacher, ta, tb, tv_cfg.steps_per_window, n, gen)
        div = kl_tv(local.log_q, local.log_p)
        local_ode = window_densities(student.model, teacher, ta, tb, tv_cfg.ode_euler_steps, n,
                                     torch.Generator().manual_seed(eval_cfg.seed + 10 + k))
        div_ode = kl_tv(local_ode.log_q, local_ode.log_p)
        x_start = teacher.sample(n, ta, torch.Generator().manual_seed(eval_cfg.seed + 10 + k))
        r_k = mc_mean(ma_value_estimate(student.model, teacher, x_start, ta, tb,
                                        substeps=tv_cfg.ode_substeps, solver="rk4"))
        window_rows.append({
            "student": name, "window": k, "t_start": ta, "t_end": tb,
            "local_tv": div["tv"].value, "local_tv_se": div["tv"].stderr,
            "local_kl": div["kl"].value, "local_kl_se": div["kl"].stderr,
            "local_folded": local.n_folded / n,
            "ode_local_kl": div_ode["kl"].value, "ode_local_kl_se": div_ode["kl"].stderr,
            "R_k_estimator_A": r_k.value, "R_k_se": r_k.stderr,
        })
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(eval_cfg.seed)).to(toy.device)
    n_windows = student.windows.n_windows
    final = sampler_divergences(student, tv_cfg.steps_per_window * n_windows, x0)
    final_ode = sampler_divergences(student, tv_cfg.ode_euler_steps * n_windows, x0)
    w = pd.DataFrame([r for r in window_rows if r["student"] == name])
    summary_rows.append({
        "student": name,
        "final_tv": final["tv"].value, "final_tv_se": final["tv"].stderr,
        "sum_local_tv": w.local_tv.sum(), "sum_local_tv_se": math.sqrt((w.local_tv_se**2).sum()),
        "pinsker_local_kl": sum(math.sqrt(max(v, 0.0) / 2) for v in w.local_kl),
        "ode_final_tv": final_ode["tv"].value, "ode_final_tv_se": final_ode["tv"].stderr,
        "pinsker_estimator_A": sum(math.sqrt(max(v, 0.0) / 2) for v in w.R_k_estimator_A),
    })
windows_table = pd.DataFrame(window_rows)
summary = pd.DataFrame(summary_rows)
display(windows_table)  # noqa: F821
display(summary)  # noqa: F821

# %% [markdown]
# ## Does each inequality hold?
# Checked with two standard errors of slack (the terms are Monte-Carlo estimates).

# %%
checks = []
for row in summary.itertuples():
    slack = 2 * math.hypot(row.final_tv_se, row.sum_local_tv_se)
    checks.append({"student": row.student,
                   "TV(Q_K,P_K) <= sum local TV": row.final_tv <= row.sum_local_tv + slack,
                   "sum local TV <= sum sqrt(KL_k/2)": row.sum_local_tv <= row.pinsker_local_kl + slack,
                   "ODE: TV(Q_K,P_K) <= sum sqrt(R_k/2)": row.ode_final_tv
                   <= row.pinsker_estimator_A + 2 * row.ode_final_tv_se})
checks = pd.DataFrame(checks)
display(checks)  # noqa: F821

# %%
fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 4.2), sharey=True, squeeze=False)
for ax, row in zip(axes[0], summary.itertuples(), strict=True):
    w = windows_table[windows_table.student == row.student]
    ax.bar(0, row.final_tv, yerr=2 * row.final_tv_se, color="tab:blue", capsize=3)
    bottom = 0.0
    colors = plt.cm.Oranges(torch.linspace(0.35, 0.85, len(w)).numpy())
    for (_, r), c in zip(w.iterrows(), colors, strict=True):
        ax.bar(1, r.local_tv, bottom=bottom, color=c, edgecolor="white", label=f"window {r.window}")
        bottom += r.local_tv
    ax.bar(2, row.pinsker_local_kl, color="tab:green")
    ax.bar(3, row.ode_final_tv, yerr=2 * row.ode_final_tv_se, color="tab:purple", capsize=3)
    ax.bar(4, row.pinsker_estimator_A, color="tab:red")
    ax.set_xticks(range(5), ["final TV\n(sampler)", "sum local TV\n(sampler)", "sum sqrt(KL_k/2)\n(sampler)",
                             "final TV\n(ODE)", "sum sqrt(R_k/2)\n(estimator A)"], fontsize=8)
    ax.set_title(row.student)
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
           "checks": checks.to_dict(orient="records")}, out / "metrics.json")
