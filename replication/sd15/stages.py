"""The SD 1.5 tier's registration: its sections of ``replication/gpu/params.yaml`` and its three
module stages, which ``replication.stage`` runs (``accelerate launch -m replication.stage NAME`` for
the training stages, in every process).

Every stage first checks its on-disk inputs (weights, caption and COCO folders, a resumed run's
saved config) and stops with a ``ConfigError`` naming the missing file before any model loads: one
line on stderr, exit status 2. These checks run in the stage function, not as registry ``checks``:
the registry runs every stage's checks whenever any stage of the params file is validated, and the
evaluation's inputs (the trained students) do not exist before training.
"""

from __future__ import annotations

from ..registry import ModuleStage, Tier
from .config import SD15EvalConfig, SD15TrainConfig

PARAMS_FILE = "replication/gpu/params.yaml"
OUTPUTS = "replication/gpu/outputs"

TIER = Tier(
    name="sd15",
    sections={"sd15_train": SD15TrainConfig, "sd15_train_perflow": SD15TrainConfig,
              "sd15_eval": SD15EvalConfig},
    stages=(
        ModuleStage("sd15_train", "replication.sd15.train:run_stage", ("sd15_train",)),
        ModuleStage("sd15_train_perflow", "replication.sd15.train:run_stage", ("sd15_train_perflow",)),
        ModuleStage("sd15_eval", "replication.sd15.evaluate:run_stage", ("sd15_eval",)),
    ),
    # the training runs (checkpoints resume them) and the generated images (reused per setting)
    persistent_outputs=(f"{OUTPUTS}/sd15_perflow_ma", f"{OUTPUTS}/sd15_perflow", f"{OUTPUTS}/sd15_eval/images"),
    params_file=PARAMS_FILE,
)
