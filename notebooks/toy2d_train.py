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
# # 2-D tier: training the four students
#
# Target: a Gaussian mixture with unequal weights. Its rectified-flow teacher is exact (closed-form
# velocity, score and log-density, METHOD.md section 6), so every discrepancy measured downstream
# belongs to the student. Four students share the architecture, the initialization seed and the
# number of steps: reflow (K = 1, stored teacher pairs) and PeRFlow (K = 4, online window starts from
# noised data), each with and without the marginal-alignment (MA) regularizer.
#
# The MA regularizer is a **reconstruction** from the paper's abstract (the full text is not available
# to us); `lambda`, sub-steps, the log-det mode and every other MA choice are parameters in
# `params.yaml`.

# %% tags=["parameters"]
params = None  # papermill injects the params.yaml sections; None reads params.yaml
out_dir = "results/toy2d/train"
checkpoint_dir = "checkpoints/toy2d"
progress = True

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from replication.notebook import save_figure, save_json, setup_plotting, stage_configs
from replication.toy2d.tier import load_student, train_student

toy, train_cfg = stage_configs(params, ["toy2d", "toy2d_train"])
setup_plotting()
out, ckpt = Path(out_dir), Path(checkpoint_dir)
out.mkdir(parents=True, exist_ok=True)

# %%
wall = {}
for name, student in train_cfg.students.items():
    tic = time.perf_counter()
    train_student(name, student, train_cfg, toy, ckpt, progress=progress)
    wall[name] = time.perf_counter() - tic
    print(f"{name}: {wall[name]:.1f} s")

# %% [markdown]
# ## Training curves
# The trajectory-matching loss `L_TM` of every student, and the MA surrogate of the MA students.
# The surrogate's *gradient* equals the gradient of `R_k`; its *value* is not `R_k` (it uses
# `-<s_T(y), y>` in place of `-log p_T(y)`), so its curve shows optimisation progress, not a KL.
# The exact KLs are in the evaluation notebooks.

# %%
rows = []
for name in train_cfg.students:
    history = load_student(name, train_cfg, ckpt).history
    for record in history:
        for part, label in (("tm", "trajectory matching L_TM"), ("ma", "MA surrogate L_MA")):
            if part in record:
                rows.append({"student": name, "step": record["step"], "term": label,
                             "value": record[part]})
curves = pd.DataFrame(rows)
grid = sns.relplot(data=curves, x="step", y="value", hue="student", col="term", kind="line",
                   facet_kws={"sharey": False}, height=3.2, aspect=1.4)
grid.axes.flat[0].set_yscale("log")
grid.set_titles("{col_name}")
grid.figure.suptitle("2-D tier: training losses", y=1.04)
save_figure(grid.figure, out / "loss_curves.png")
plt.show()

# %%
final = {name: load_student(name, train_cfg, ckpt).history[-1] for name in train_cfg.students}
summary = pd.DataFrame(final).T.drop(columns="step")
summary["wall_seconds"] = pd.Series(wall)
display(summary)  # noqa: F821 (notebook builtin)
# wall times are shown above but kept out of metrics.json, which must be a function of the inputs
save_json({"students": {name: {"final_tm": record["tm"], "final_ma_surrogate": record.get("ma")}
                        for name, record in final.items()},
           "steps": train_cfg.steps, "batch_size": train_cfg.batch_size},
          out / "metrics.json")
