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
# velocity, score and log-density, docs/method.md, section 6), so every discrepancy measured downstream
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
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from replication.notebook import (
    print_wall_time,
    save_figure,
    save_json,
    setup_plotting,
    stage_configs,
)
from replication.toy2d.tier import load_student, loss_curves, train_students

toy, train_cfg = stage_configs(params, ["toy2d", "toy2d_train"])
setup_plotting()
out, ckpt = Path(out_dir), Path(checkpoint_dir)
out.mkdir(parents=True, exist_ok=True)

# %%
results = train_students(train_cfg, toy, ckpt, progress=progress)
for name, result in results.items():
    print_wall_time(name, result.wall_seconds, f"{result.steps - result.resumed_from} steps trained, "
                    f"{result.resumed_from} resumed from a checkpoint")

# %% [markdown]
# ## Training curves
# The trajectory-matching loss `L_TM` of every student, and the MA surrogate of the MA students.
# The surrogate's *gradient* equals the gradient of `R_k`; its *value* is not `R_k` (it uses
# `-<s_T(y), y>` in place of `-log p_T(y)`), so its curve shows optimisation progress, not a KL.
# The exact KLs are in the evaluation notebooks.

# %%
histories = {name: load_student(name, train_cfg, toy, ckpt).history for name in train_cfg.students}
grid = sns.relplot(data=loss_curves(histories), x="step", y="value", hue="student", col="term",
                   kind="line", facet_kws={"sharey": False}, height=3.2, aspect=1.4)
grid.axes.flat[0].set_yscale("log")
grid.set_titles("{col_name}")
grid.figure.suptitle(f"2-D tier: training losses (batch {train_cfg.batch_size}, "
                     f"{train_cfg.steps} steps)", y=1.04)
save_figure(grid.figure, out / "loss_curves.png")
plt.show()

# %%
final = {name: history[-1] for name, history in histories.items()}
display(pd.DataFrame(final).T.drop(columns="step"))  # noqa: F821 (notebook builtin)
save_json({"students": {name: {"final_tm": record["tm"], "final_ma_surrogate": record.get("ma")}
                        for name, record in final.items()},
           "steps": train_cfg.steps, "batch_size": train_cfg.batch_size},
          out / "metrics.json")
