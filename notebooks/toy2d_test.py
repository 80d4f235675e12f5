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
# # 2-D tier: tuned students on fresh test seeds
#
# **Honest selection.** Each tuned setting (the MA weight `lambda` of PeRFlow + MA and of reflow +
# MA) is chosen from its sweep family, which was trained on the *validation* seeds only; the rule is
# written in params.yaml (`toy2d_test.select`) and applied by `replication/toy2d/selection.py`, which
# refuses any split but validation. Then every student is trained afresh on the *test* seeds and
# scored there: these are the reported numbers. Paired tests over the test seeds, Holm-corrected
# over every comparison, metric and NFE, with the minimum detectable effect of each. KL(q || p) is
# mode-seeking; TV and the mode-mass error (coverage) stand beside it. The MA regularizer is a
# reconstruction (docs/method.md, section 4).

# %% tags=["parameters"]
params = None
out_dir = "results/toy2d/test"
checkpoint_root = "checkpoints/toy2d_test"
sweep_results = "results/toy2d/sweep"
progress = True

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from replication.notebook import save_figure, save_json, setup_plotting, stage_configs, write_text
from replication.toy2d.evaluate import evaluate_student
from replication.toy2d.selection import (
    compare_students,
    score_seeds,
    select_value,
    tuned_students,
    verdict_sentences,
)
from replication.toy2d.sweep import METRICS, aggregate
from replication.toy2d.tier import load_run, make_teacher, train_student

toy, train_cfg, eval_cfg, sweep, test_cfg = stage_configs(
    params, ["toy2d", "toy2d_train", "toy2d_eval", "toy2d_sweep", "toy2d_test"])
setup_plotting()
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Selection on the validation seeds

# %%
selections = {}
for student, rule in test_cfg.select.items():
    family_metrics = json.loads((Path(sweep_results) / rule.family / "metrics.json").read_text())
    selections[student] = select_value(student, rule, family_metrics, sweep.test_seeds)
display(pd.DataFrame([s.as_dict() for s in selections.values()]))  # noqa: F821 (notebook builtin)

# %% [markdown]
# ## Every student on the test seeds

# %%
students = tuned_students(train_cfg, sweep.families, selections)
runs = score_seeds(students, sweep.test_seeds, toy, eval_cfg, Path(checkpoint_root), train_student,
                   load_run, evaluate_student, make_teacher(toy), progress)
cells = pd.DataFrame(aggregate(runs, sweep.level, keys=("student", "nfe")))
display(cells[["student", "nfe", "seeds", "kl", "kl_hw", "tv", "tv_hw", "mode_mass_error",  # noqa: F821
               "mode_mass_error_hw", "folded", "crosses_windows", "status"]])

# %%
comparisons = compare_students(runs, test_cfg.compare, test_cfg.metrics, test_cfg.alpha, test_cfg.power)
sentences = verdict_sentences(comparisons, test_cfg.alpha)
print("\n".join(sentences))

# %%
long = cells.melt(id_vars=["student", "nfe"], value_vars=["kl", "tv", "mode_mass_error"],
                  var_name="metric", value_name="mean")
grid = sns.catplot(data=long, x="nfe", y="mean", hue="student", col="metric", kind="point",
                   sharey=False, height=3.0, aspect=1.1, errorbar=None, dodge=0.3)
for ax, metric in zip(grid.axes.flat, ["kl", "tv", "mode_mass_error"], strict=True):
    ax.set_yscale("log" if metric == "kl" else "linear")
grid.set_titles("{col_name}")
grid.figure.suptitle(f"2-D tier, test seeds {sweep.test_seeds} ({eval_cfg.n_samples} samples per run)", y=1.05)
save_figure(grid.figure, out / "test_table.png")
plt.show()

# %%
keep = ["student", "nfe", "seeds", *[c for m in METRICS for c in (m, f"{m}_hw")], "crosses_windows", "status"]
cells[keep].to_csv(out / "table.csv", index=False, float_format="%.6g")
save_json({"seeds": {"validation": sweep.validation_seeds, "test": sweep.test_seeds},
           "n_samples": eval_cfg.n_samples, "interval": f"{sweep.level:.0%} Student-t half-width over seeds",
           "selected": [s.as_dict() for s in selections.values()],
           "students": {name: {"windows": st.windows, "ma": st.ma,
                               "ma_weight": st.ma_config(cfg.ma).weight if st.ma else None}
                        for name, (cfg, st) in students.items()},
           "rows": cells[keep].to_dict("records"), "comparisons": comparisons}, out / "metrics.json")
def cell(row, metric):
    value, hw = row[metric], row[f"{metric}_hw"]
    return "–" if pd.isna(value) else f"{value:.3g}" + ("" if pd.isna(hw) else f" ± {hw:.2g}")


chosen = [f"- {s.student}: `{s.parameter}` = {s.value} from {s.grid}, {s.criterion} (validation {s.score:.3g}"
          + (f" ± {s.score_hw:.2g}" if s.score_hw is not None else "") + ")"
          + (f"; runner-up {s.runner_up} ({s.runner_up_score:.3g})" if s.runner_up is not None else "")
          + ("; the runner-up lies inside its interval" if s.within_interval else "")
          + ("; **at the edge of its grid**" if s.on_grid_edge else "") + "."
          for s in selections.values()]
nfes = sorted(cells["nfe"].unique())
table = ["| student | " + " | ".join(f"KL {n} NFE" for n in nfes) + " | " + " | ".join(
             f"mode-mass err. {n}" for n in nfes) + " |", "|:--|" + "--:|" * (2 * len(nfes))]
for student, group in cells.groupby("student", sort=False):
    rows = {r["nfe"]: r for _, r in group.iterrows()}
    marks = {n: "*" if rows[n]["crosses_windows"] else "" for n in nfes}
    table.append(f"| {student} | " + " | ".join(cell(rows[n], "kl") + marks[n] for n in nfes) + " | "
                 + " | ".join(cell(rows[n], "mode_mass_error") for n in nfes) + " |")
write_text("Generated by `notebooks/toy2d_test.py` from `metrics.json`; do not edit by hand.\n\n"
           f"Selected on validation seeds {sweep.validation_seeds} (`toy2d_test.select`), then every student "
           f"trained afresh on test seeds {sweep.test_seeds} and scored there ({eval_cfg.n_samples} samples per run "
           "and NFE; mean ± 95% Student-t half-width over seeds; `*`: fewer steps than windows, outside "
           "PeRFlow's design):\n\n" + "\n".join(chosen) + "\n\n" + "\n".join(table) + "\n\n"
           + "\n".join(sentences) + "\n", out / "summary.md")
