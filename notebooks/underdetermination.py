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
# # Trajectory matching under-determines the marginal
#
# docs/method.md, section 3: the trajectory-matching loss regresses the *pairing* `(x_s, y_T)`, while the
# marginal the student produces depends on the *structure* of its error, not its size. Two honest
# demonstrations on the exact 2-D tier:
#
# 1. **Analytic construction.** `T` is the exact teacher map (noise to data). Student *rotated* maps
#    `x0 -> T(R x0)` with `R` a rotation: since `R x0 ~ N(0, I)`, its marginal is exactly the
#    teacher's, yet it misses every pairing. Student *shifted* maps `x0 -> T(x0) + c` with `|c|^2`
#    chosen equal to the rotated student's error. Both have the same endpoint-matching error
#    `E|S(x0) - T(x0)|^2` (summed over coordinates: D times a one-step student's per-dimension
#    trajectory-matching loss); their KL
#    to the teacher differs completely. Densities come from log-density tracking along the teacher ODE.
# 2. **Trained students.** Every training snapshot of the PeRFlow students, scored on the same
#    trajectory-matching loss and on the exact KL of its few-step sampler.

# %% tags=["parameters"]
params = None
out_dir = "results/toy2d/underdetermination"
checkpoint_dir = "checkpoints/toy2d"
progress = True

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import FormatStrFormatter

from replication.notebook import save_figure, save_json, setup_plotting, stage_configs
from replication.toy2d.evaluate import eval_noise
from replication.toy2d.metrics import as_row
from replication.toy2d.tier import make_teacher
from replication.toy2d.underdetermination import (
    TEACHER,
    analytic_construction,
    closest_tm_pair,
    score_snapshots,
)

toy, train_cfg, eval_cfg, ud_cfg = stage_configs(
    params, ["toy2d", "toy2d_train", "toy2d_eval", "underdetermination"])
setup_plotting()
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
teacher = make_teacher(toy)

# %% [markdown]
# ## 1. Analytic construction

# %%
x0 = eval_noise(eval_cfg, ud_cfg.n_samples, toy.device)
construction = analytic_construction(teacher, x0, ud_cfg.rotation_degrees, ud_cfg.teacher_steps)
analytic = pd.DataFrame([as_row(student=s.name, matching_error=s.matching_error, kl=s.kl, tv=s.tv)
                         for s in construction.students])
print(f"n = {ud_cfg.n_samples} samples, teacher map: {ud_cfg.teacher_steps} RK4 steps, "
      f"rotation {ud_cfg.rotation_degrees} degrees")
display(analytic)  # noqa: F821

# %%
fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.6), sharex=True, sharey=True)
y_teacher = construction.by_name(TEACHER).samples.cpu()
lim = float(max(s.samples.abs().max() for s in construction.students)) + 0.3
for ax, student in zip(axes, construction.students, strict=True):
    y = student.samples.cpu()
    ax.scatter(y[:, 0], y[:, 1], s=2, alpha=0.3, linewidths=0)
    if student.name != TEACHER:
        for a, b in zip(y_teacher[:60], y[:60], strict=True):
            ax.annotate("", xy=b.tolist(), xytext=a.tolist(),
                        arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 0.6, "alpha": 0.6})
    ax.set_title(f"{student.name}\nmatching error {student.matching_error:.3f}, "
                 f"KL {student.kl.value:.3g} ± {student.kl.stderr:.2g}", fontsize=10)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
fig.suptitle("Same trajectory-matching error, different marginals (arrows: teacher pair -> student)",
             y=1.02)
save_figure(fig, out / "analytic_students.png")
plt.show()

# %% [markdown]
# ## 2. Trained snapshots: trajectory-matching loss vs exact KL
# Every snapshot is scored on the same trajectory-matching batch (`tm_eval_batch` samples, fine
# teacher solve of `teacher_steps` RK4 steps), so the TM difference of two snapshots has a *paired* standard error. Two snapshots
# count as having the same TM loss when that difference is within `tm_equal_within_se` paired
# standard errors; among such pairs, the one with the largest KL ratio is marked.

# %%
scores = score_snapshots(teacher, train_cfg, toy, eval_cfg, ud_cfg, Path(checkpoint_dir))
snapshots = pd.DataFrame([s.as_row() for s in scores])
print(f"KL: n = {ud_cfg.n_samples} samples of the {ud_cfg.nfe}-NFE sampler; "
      f"TM loss: {eval_cfg.tm_eval_batch} samples")
display(snapshots)  # noqa: F821
best = closest_tm_pair(scores, ud_cfg.tm_equal_within_se)
if best is None:
    print(f"no two snapshots have TM losses within {ud_cfg.tm_equal_within_se} paired standard errors")
else:
    print(f"{best.a.student}@{best.a.step} vs {best.b.student}@{best.b.step}: "
          f"TM {best.a.tm.value:.4f} vs {best.b.tm.value:.4f} (paired difference "
          f"{best.tm_difference.value:+.4f} ± {best.tm_difference.stderr:.4f}, "
          f"{best.tm_gap_in_se:.1f} paired SE), KL {best.a.kl.value:.3f} vs {best.b.kl.value:.3f} "
          f"(ratio {best.kl_ratio:.2f})")

# %%
fig, ax = plt.subplots(figsize=(6.2, 4.4))
sns.scatterplot(data=snapshots, x="tm_loss", y="kl", hue="student", style="student", s=60, ax=ax)
ax.errorbar(snapshots.tm_loss, snapshots.kl, xerr=snapshots.tm_loss_se, yerr=snapshots.kl_se,
            fmt="none", ecolor="0.5", lw=0.8)
if best is not None:
    pts = [best.a, best.b]
    ax.plot([p.tm.value for p in pts], [p.kl.value for p in pts], "k--", lw=1,
            label="statistically equal TM loss")
    ax.legend(fontsize=8)
    ax.annotate(f"TM {best.a.tm.value:.4f} vs {best.b.tm.value:.4f}\n"
                f"KL {best.a.kl.value:.2f} vs {best.b.kl.value:.2f}",
                xy=(best.b.tm.value, best.b.kl.value), xytext=(12, -6), textcoords="offset points",
                fontsize=8)
ax.set_xscale("log")
ax.set_yscale("log")
for axis in (ax.xaxis, ax.yaxis):  # label minor ticks too: the range spans about one decade
    axis.set_major_formatter(FormatStrFormatter("%.3g"))
    axis.set_minor_formatter(FormatStrFormatter("%.3g"))
ax.tick_params(axis="x", which="both", labelsize=8, labelrotation=45)
ax.set_xlabel(f"trajectory-matching loss (fresh batch of {eval_cfg.tm_eval_batch}, "
              f"{eval_cfg.teacher_steps}-step RK4 teacher)")
ax.set_ylabel(f"KL(student || teacher), {ud_cfg.nfe} NFE, n = {ud_cfg.n_samples}")
ax.set_title("Training snapshots: TM loss does not determine the marginal")
save_figure(fig, out / "snapshots_tm_vs_kl.png")
plt.show()

# %%
save_json({"analytic": analytic.to_dict(orient="records"), "rotation_degrees": ud_cfg.rotation_degrees,
           "shift": construction.shift, "n_samples": ud_cfg.n_samples,
           "tm_eval_batch": eval_cfg.tm_eval_batch, "snapshots": snapshots.to_dict(orient="records"),
           "closest_pair": None if best is None else best.summary()},
          out / "metrics.json")
