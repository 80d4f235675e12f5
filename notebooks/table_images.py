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
# # Image tier: the main table
#
# Methods x NFE, scored against the held-out split: **FID, KID, precision and recall** in the
# TF-2015 Inception features (computed by torch-fidelity), the **domain FD** in the features of a
# classifier trained on the same data (not comparable to Inception FID), the **class-mass TV** (total
# variation between the predicted class frequencies of the samples and the held-out labels' frequencies)
# and **KL(student || teacher)**, the quantity MA claims to reduce, measured with the learned teacher:
# the student's exact log-density by the change of variables of each Euler step (D x D Jacobians)
# against the teacher's CNF log-density (Hutchinson, with its error bar).
#
# Each training seed has its own noise draw, shared by the students of that seed (the teacher uses
# seed 0's). Intervals are 95% Student-t intervals over *training seeds*, so they cover training and
# evaluation noise; the +MA deltas are paired by seed and Holm-corrected over the headline family. The MA regularizer is a **reconstruction** from the
# paper's abstract (docs/method.md, section 4); the paper's own numbers are unknown. Sample counts
# are printed with every table: on this CPU they are small, so FIDs are strongly biased upward
# (compare rows with each other, never with published FIDs).

# %% tags=["parameters"]
params = None  # papermill injects the params.yaml sections; None reads params.yaml
out_dir = "results/images/table"
checkpoint_dir = "checkpoints/images"
progress = True

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from replication.images.evaluate import image_grid
from replication.images.reference import load_reference
from replication.images.scoring import kl_rows, sample_sets, score_rows
from replication.images.summary import summary_markdown
from replication.images.table import (
    HEADLINE,
    METRICS,
    aggregate,
    corrected,
    formatted,
    ma_deltas,
    mark_off_design,
)
from replication.images.tier import load_split, load_teacher
from replication.notebook import (
    print_wall_time,
    save_figure,
    save_json,
    setup_plotting,
    stage_configs,
    write_text,
)

images, ref_cfg, students_cfg, cfg = stage_configs(
    params, ["images", "images_reference", "images_students", "table_images"])
setup_plotting()
out, root = Path(out_dir), Path(checkpoint_dir)
out.mkdir(parents=True, exist_ok=True)
split = load_split(images)
teacher, _ = load_teacher(images, root)
reference = load_reference(images, ref_cfg, root)

# %%
sets = sample_sets(images, students_cfg, cfg, root, teacher, split, progress)
for key, seconds in sets.seconds.items():
    print_wall_time(f"sampling {key}", seconds)
print(f"sample counts per set: {cfg.inception_samples} for Inception FID/KID/PR, {cfg.domain_samples} "
      f"for the domain FD and class mass; reference: {reference.n_reference} held-out images; "
      f"teacher: {cfg.teacher_method} (rtol {cfg.teacher_rtol:g}), mean NFE {sets.teacher_nfe:.0f}")

# %%
rows, seconds = score_rows(sets, reference, cfg, progress)
print_wall_time("scoring", seconds)
kl, kl_seconds = kl_rows(sets, teacher, students_cfg, images, cfg, root, progress)
print_wall_time("KL to teacher", kl_seconds)
rows = rows.merge(kl, on=["method", "seed", "nfe"], how="outer", sort=False) if len(kl) else rows
rows = mark_off_design(rows, {name: s.windows for name, s in students_cfg.students.items()})
save_json({"sampling": sets.seconds, "scoring": seconds, "kl": kl_seconds},
          out / "costs.json")  # machine-dependent: git-ignored, not a DVC output
metrics = [m for m, _, _ in METRICS if m in rows]
summary = aggregate(rows, metrics)

# %% [markdown]
# ## The table
# Mean over training seeds ± the 95% interval half-width (`(1 seed)` where a student has one seed).
# `teacher` rows: the adaptive teacher ODE (its mean NFE in the `nfe` column); `train real`:
# training images scored like samples (the floor of each metric at this sample count).

# %%
print(f"Inception metrics on {cfg.inception_samples} samples per set; domain FD / class mass on "
      f"{cfg.domain_samples} (against {reference.n_reference} held-out images and "
      f"{cfg.teacher_reference_samples} teacher samples); KL on {cfg.kl.n_samples} samples "
      f"({cfg.kl.probes} Hutchinson probes, {cfg.kl.teacher_steps} {cfg.kl.teacher_solver} teacher steps; "
      f"refined: {cfg.kl.refined_steps})")
display(formatted(summary, metrics))  # noqa: F821 (notebook builtin)

# %% [markdown]
# ## Does MA help? PeRFlow+MA - PeRFlow, paired by seed
# A negative delta of a lower-is-better metric favours MA. The headline metrics (`HEADLINE`) form one
# family of paired t-tests, Holm-corrected together; each test prints its minimum detectable effect
# (power 0.8 at the family's first-test level). Other metrics: uncorrected 95% intervals only.

# %%
deltas = ma_deltas(rows, "perflow_ma", "perflow", metrics)
reflow_deltas = ma_deltas(rows, "reflow_ma", "reflow", metrics)
both = pd.concat([deltas.assign(comparison="perflow_ma - perflow"),
                  reflow_deltas.assign(comparison="reflow_ma - reflow")], ignore_index=True)
family = corrected(both[both.metric.isin(HEADLINE)].reset_index(drop=True))
tested = int(family.p_value.notna().sum())
print(f"{tested} paired tests in the family (Holm, alpha 0.05); seeds per test: "
      f"{sorted(set(family.seeds))}")
display(family.drop(columns=["differences"]))  # noqa: F821 (notebook builtin)

# %%
def nfe_axis(ax, nfes):
    """Log-2 NFE axis with plain tick labels (1, 2, 4, 8) and no minor ticks."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(nfes, labels=[str(n) for n in nfes])
    ax.minorticks_off()


panels = [m for m in ("kl", "domain_fd_teacher", "domain_recall_teacher", "class_mass_error") if m in rows]
fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False,
                         layout="constrained")
students_only = rows[rows.method.isin(list(students_cfg.students))]
for ax, metric in zip(axes[0], panels, strict=True):
    part = students_only[students_only[metric].notna()]
    sns.lineplot(data=part, x="nfe", y=metric, hue="method", marker="o", errorbar=("ci", 95), seed=0, ax=ax,
                 legend=ax is axes[0][-1])
    nfe_axis(ax, sorted(part.nfe.unique()))
    ax.set(title=dict((m, label) for m, label, _ in METRICS)[metric], xlabel="NFE", ylabel="")
sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1.0))
fig.suptitle("image tier: seed mean and 95% bootstrap interval over training seeds", y=1.03)
save_figure(fig, out / "metrics_vs_nfe.png")
plt.show()

fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False,
                         layout="constrained")
for ax, metric in zip(axes[0], panels, strict=True):
    part = family[(family.metric == metric) & (family.comparison == "perflow_ma - perflow")]
    if len(part):
        ax.errorbar(part.nfe, part.delta, yerr=part.ci95.fillna(0), fmt="o", capsize=3)
        for r in part.itertuples():
            ax.annotate("*" if r.verdict_holm in ("MA better", "MA worse") else "", (r.nfe, r.delta),
                        textcoords="offset points", xytext=(6, 0))
        nfe_axis(ax, sorted(part.nfe.unique()))
    ax.axhline(0, color="k", lw=0.8)
    ax.set(title=metric, xlabel="NFE", ylabel="PeRFlow+MA - PeRFlow" if ax is axes[0][0] else "")
fig.suptitle("PeRFlow+MA - PeRFlow, paired by seed: mean and uncorrected 95% t interval "
             "(* = significant after Holm over the headline family)", y=1.04)
save_figure(fig, out / "ma_deltas.png")
plt.show()

# %% [markdown]
# ## Samples
# Training seed 0 of each student and the teacher share one noise draw.

# %%
grid_rows = {"teacher": sets.teacher[: cfg.grid_samples]}
for name in students_cfg.students:
    for nfe in cfg.nfe:
        grid_rows[f"{name} {nfe} NFE"] = sets.students[(name, students_cfg.students[name].seeds[0], nfe)][: cfg.grid_samples]
fig = image_grid(grid_rows, ncols=cfg.grid_samples)
save_figure(fig, out / "sample_grid.png")
plt.show()

# %% [markdown]
# ## The results in words
# Every sentence below is generated from the frames above (`replication/images/summary.py`) and
# written to `summary.md`; the README carries a copy, checked by a test.

# %%
counts = {"inception_samples": cfg.inception_samples, "domain_samples": cfg.domain_samples,
          "reference_images": reference.n_reference, "kl_samples": cfg.kl.n_samples,
          "teacher_reference_samples": cfg.teacher_reference_samples}
text = summary_markdown(summary, rows, family, counts, cfg.kl.teacher_steps, cfg.kl.refined_steps, cfg.nfe)
print(text)
write_text(text, out / "summary.md")

# %%
rows.to_csv(out / "table.csv", index=False, float_format="%.6g")
save_json({"rows": rows.to_dict(orient="records"), "summary": summary.to_dict(orient="records"),
           "perflow_ma_minus_perflow": deltas.to_dict(orient="records"),
           "reflow_ma_minus_reflow": reflow_deltas.to_dict(orient="records"),
           "paired_tests_holm": family.to_dict(orient="records"), "headline_metrics": list(HEADLINE),
           "counts": counts, "teacher_mean_nfe": sets.teacher_nfe}, out / "metrics.json")
