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

from replication.images.evaluate import convergence, loss_frame
from replication.images.tier import (
    HELDOUT_MA_ROWS,
    build_banks,
    heldout,
    load_student,
    load_teacher,
    optim_summary,
    train_students,
)
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
# Left to right: the trajectory-matching loss `L_TM` of each logged training batch; `L_TM` on a fixed
# held-out batch (window pairs from the held-out split; reflow: pairs from fresh noise), whose
# plateau is the convergence criterion; the MA surrogate of the MA runs (its value is not a KL; its
# gradient is that of the sampler's window KL); and the gradient norms of the two terms on the
# logged MA steps, before clipping (`lambda` included in the MA norm): the effective weight of MA.
# The KL itself is measured in `table_images`.

# %%
histories = {f"{name} (seed {seed})": load_student(name, seed, images, cfg, root)[2]
             for name, seed in cfg.runs()}
frame = loss_frame(histories, ("tm", "heldout_tm", "ma", "grad_norm_tm", "grad_norm_ma"))
frame["student"] = frame["run"].str.split(" ").str[0]
frame["panel"] = frame["term"].map({"tm": "L_TM (training batch)", "heldout_tm": "L_TM (held-out)",
                                    "ma": "MA surrogate", "grad_norm_tm": "gradient norm",
                                    "grad_norm_ma": "gradient norm"})
frame["term"] = frame["term"].replace({"grad_norm_tm": "TM", "grad_norm_ma": "lambda MA"})
grid = sns.relplot(data=frame, x="step", y="value", hue="student", style="term", units="run",
                   estimator=None, col="panel", col_wrap=4, kind="line", height=3.0, aspect=1.2,
                   alpha=0.6, facet_kws={"sharey": False},
                   col_order=["L_TM (training batch)", "L_TM (held-out)", "MA surrogate", "gradient norm"])
for ax in grid.axes.flat:
    if ax.get_title().endswith("norm"):
        ax.set_yscale("log")
grid.set_titles("{col_name}")
sns.move_legend(grid, "upper left", bbox_to_anchor=(1.0, 0.9))
grid.figure.suptitle(f"image tier: student losses, every run drawn ({optim_summary(cfg)})", y=1.04)
save_figure(grid.figure, out / "loss_curves.png")
plt.show()

# %% [markdown]
# ## Convergence and held-out values
# `heldout_tm_tail_change`: relative change of the held-out `L_TM` over the last third of training
# (second half of that third against its first half; about 0 on a plateau, negative while it still
# falls). `heldout_ma`: the MA surrogate's value on the same 64 held-out rows for every student of a
# pairing (per dimension; lower is better aligned up to a constant shared by those students).

# %%
final = {}
teacher_net = load_teacher(images, root)[0]
for (name, seed), run in zip(cfg.runs(), histories, strict=True):
    model = load_student(name, seed, images, cfg, root)[0]
    scorer = heldout(cfg.students[name], cfg, images, teacher_net, root, progress=False)
    last_train = [r for r in histories[run] if "tm" in r][-1]
    final[run] = {**convergence(histories[run]), "heldout_ma": scorer.ma_value(model),
                  "train_tm_last_logged": last_train["tm"]}
table = pd.DataFrame(final).T
display(table)  # noqa: F821 (notebook builtin)
change = table["heldout_tm_tail_change"].astype(float).abs()
if change.notna().any():
    print(f"largest |relative change| of the held-out L_TM over the last third of training: "
          f"{change.max():.3f} ({change.idxmax()})")
else:
    print("too few logged steps to measure a plateau (fewer than 4 in the last third)")
save_json({"runs": final, "steps": cfg.steps, "batch_size": cfg.batch_size,
           "heldout_entries": cfg.heldout_entries, "heldout_ma_rows": min(HELDOUT_MA_ROWS, cfg.heldout_entries)}, out / "metrics.json")
