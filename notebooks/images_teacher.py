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
# # Image tier: the learned teacher
#
# A diffusers `UNet2DModel` trained by conditional flow matching (`x_t = (1 - t) x0 + t x1`, target
# `x1 - x0`) on the training split. Unlike the 2-D tier's exact teacher, this one has training error:
# everything the students are measured against downstream is *this* teacher, whose many-step
# adaptive-ODE samples are the ceiling of every few-step student.

# %% tags=["parameters"]
params = None  # papermill injects the params.yaml sections; None reads params.yaml
out_dir = "results/images/teacher"
checkpoint_dir = "checkpoints/images"
progress = True

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns
import torch

from marflow_core import stream
from marflow_core.unet import parameter_count
from replication.images.evaluate import adaptive_teacher_samples, image_grid, loss_frame
from replication.images.tier import load_split, load_teacher, optim_summary, run_cost, train_teacher
from replication.notebook import (
      print_wall_time,
      save_figure,
      save_json,
      setup_plotting,
      stage_configs,
)

images, cfg = stage_configs(params, ["images", "images_teacher"])
setup_plotting()
out, root = Path(out_dir), Path(checkpoint_dir)
out.mkdir(parents=True, exist_ok=True)
split = load_split(images)
print(f"{split.name}: {len(split.train)} training and {len(split.heldout)} held-out images of shape "
      f"{tuple(split.train.shape[1:])}, in [-1, 1]")

# %%
result = train_teacher(images, cfg, root, progress=progress)
cost = run_cost(result)
print_wall_time("teacher training", result.wall_seconds,
                f"{cost.steps_trained} steps trained, {cost.resumed_from} resumed; "
                f"{cost.seconds_per_step or 0:.3f} s/step; peak RSS {cost.peak_rss_mib:.0f} MiB")
save_json({"teacher": {**cost.__dict__, "wall_seconds": result.wall_seconds}},
          out / "costs.json")  # machine-dependent: git-ignored, not a DVC output
teacher, history = load_teacher(images, root, cfg)
print(f"teacher: {parameter_count(teacher) / 1e6:.2f} M parameters, {optim_summary(cfg)}")

# %% [markdown]
# ## Training curve and samples
# Flow-matching loss (its floor is not zero: the conditional target `x1 - x0` has variance), and
# samples of the teacher ODE solved adaptively (the same solver as the table's teacher rows).

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
sns.lineplot(data=loss_frame({"teacher": history}, ("fm",)), x="step", y="value", ax=ax)
ax.set(yscale="log", ylabel="flow-matching loss", title=f"teacher ({optim_summary(cfg)})")
save_figure(fig, out / "loss_curve.png")
plt.show()

x0 = torch.randn((cfg.grid_samples, *teacher.sample_shape), generator=stream(cfg.seed, "teacher-grid"))
samples, nfe = adaptive_teacher_samples(teacher, x0.to(images.device), "dopri5", 1e-4, 1e-4)
fig = image_grid({"teacher (dopri5)": samples, "training images": split.train[: cfg.grid_samples]},
                 ncols=16)
save_figure(fig, out / "teacher_samples.png")
plt.show()

# %%
save_json({"final_fm_loss": history[-1]["fm"], "steps": cfg.steps, "batch_size": cfg.batch_size,
           "parameters": parameter_count(teacher), "dopri5_nfe_for_grid": nfe,
           "train_images": len(split.train), "heldout_images": len(split.heldout)},
          out / "metrics.json")
