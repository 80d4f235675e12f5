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
# # The comparison report and the headline metrics
#
# Reads the other stages' metrics files (an absent one is `not run`), decides each claim of the
# abstract per tier by the written rules of `replication/report/claims.py`, sets every tier's rows
# beside the published ones at matching protocol (`replication/references/`), and writes
# `REPORT.md` and the flat `headline.json` that `dvc metrics show` / `dvc metrics diff` read. The
# report prints no number that is not in its inputs: `write_report` checks every numeric token and
# refuses to write otherwise.

# %% tags=["parameters"]
params = None  # papermill injects the params.yaml sections; None reads params.yaml
out_dir = "results/report"
progress = True

# %%
from pathlib import Path

from IPython.display import Markdown, display

from replication.config import load_params
from replication.report.build import write_report

params = load_params("params.yaml") if params is None else params
out = Path(out_dir)
text, flat = write_report(".", {"images": params["images"], "report": params["report"]}, out)
print(f"headline.json: {len(flat)} numbers; REPORT.md: {len(text.splitlines())} lines")

# %%
display(Markdown(text))  # noqa: F821
