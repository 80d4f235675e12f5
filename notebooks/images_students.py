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
# # Image tier: training the students
#
# Every student starts from the teacher's weights and is trained with the same optimizer, batch and
# steps. **Reflow** (K = 1) regresses pairs `(x0, Phi^T(x0))` of the teacher ODE; **PeRFlow** (K = 4)
# regresses window pairs `(x_s, Phi^T_k(x_s))` with `x_s` noised training images. Both pair sets are
# generated once (a pair bank and a window bank, sharded by seed, cached by DVC) and shared by every
# student and seed, so `+MA` and its baseline see the same pairs. Training seeds change the data
# order, the times and the Hutchinson probes.
#
# **MA** (a reconstruction, docs/method.md, section 4) adds `lambda L_MA`: the student's log-density
# tracked through each window by a Hutchinson divergence, scored by the frozen teacher's
# `score_from_velocity` (cut off at `t_max`), normalised by the dimension. Every MA choice is a
# parameter in `params.yaml`.

# %% tags=["parameters"]
params = None  # papermill injects the params.yaml sections; None reads params.yaml
out_dir = "results/images/students"
checkpoint_dir = "checkpoints/images"
progress = True

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from replication.images.evaluate import loss_frame
from replication.images.tier import build_banks, load_student, optim_summary, train_students
from replication.notebook import (
    print_wall_time,
    save_figure,
    save_json,
    setup_plotting,
    stage_configs,
)

images, cfg = stage_configs(params, ["images", "images_students"])
setup_plotting()
out, root = Path(out_dir), Path(checkpoint_dir)
out.mkdir(parents=True, exist_ok=True)
for name, student in cfg.students.items():
    ma = student.ma_config(cfg.ma)
    ma_text = (f"MA lambda={ma.weight:g}, {ma.substeps} sub-step(s)/window, {ma.divergence} divergence "
               f"({ma.n_probes} probe(s)), every {ma.every} step(s)" if ma else "no MA")
    print(f"{name}: {student.method}, K={student.windows}, seeds {student.seeds}, {ma_text}")
print(f"all students: {optim_summary(cfg)}")

# %%
banks = build_banks(images, cfg, root, progress)
for bank, seconds in banks.items():
    print_wall_time(f"bank {bank}", seconds)
p, w = cfg.reflow_pairs, cfg.window_bank
print(f"reflow pairs: {p.n_pairs} ({p.steps} {p.solver} steps per pair); window bank: {w.n_entries} "
      f"entries ({w.teacher_steps} {w.solver} steps per window)")

# %%
costs = {f"bank {bank}": {"seconds": seconds} for bank, seconds in banks.items()}
results = train_students(images, cfg, root, progress)
for (name, seed), (result, cost) in results.items():
    costs[f"{name}/seed{seed}"] = {**cost.__dict__, "wall_seconds": result.wall_seconds}
    print_wall_time(f"{name} seed {seed}", result.wall_seconds,
                    f"{cost.steps_trained} steps trained, {cost.resumed_from} resumed; "
                    f"{cost.seconds_per_step or 0:.3f} s/step; peak RSS {cost.peak_rss_mib:.0f} MiB")
save_json(costs, out / "costs.json")  # machine-dependent: git-ignored, not a DVC output

# %% [markdown]
# ## Training curves
# Trajectory-matching loss `L_TM` of every run and the MA surrogate of the MA runs (its value is not a
# KL; its gradient is that of the window KL). The KL itself is measured in `table_images`.

# %%
histories = {f"{name} (seed {seed})": load_student(name, seed, images, cfg, root)[2]
             for name, seed in cfg.runs()}
frame = loss_frame(histories, ("tm", "ma"))
frame["student"] = frame["run"].str.split(" ").str[0]
grid = sns.relplot(data=frame, x="step", y="value", hue="student", units="run", estimator=None,
                   col="term", kind="line", facet_kws={"sharey": False}, height=3.2, aspect=1.4,
                   alpha=0.7)
grid.set_titles("{col_name}")
grid.figure.suptitle(f"image tier: student losses ({optim_summary(cfg)})", y=1.04)
save_figure(grid.figure, out / "loss_curves.png")
plt.show()

# %%
final = {run: {k: v for k, v in history[-1].items() if k != "step"} for run, history in histories.items()}
display(pd.DataFrame(final).T)  # noqa: F821 (notebook builtin)
save_json({"runs": final, "steps": cfg.steps, "batch_size": cfg.batch_size}, out / "metrics.json")
