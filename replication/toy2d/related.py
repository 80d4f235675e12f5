"""The related few-step methods on the exact 2-D tier: Local Flow Matching and flow map matching rows.

Every method is trained by the shared loop (``marflow_core.train``) with ``toy2d_train``'s optimizer,
steps, batch size and network widths, on exact samples of the data mixture (the batch of every step),
on the first ``n_seeds`` test seeds; scored with the tier's exact metrics at ``toy2d_eval.nfe`` on
the shared evaluation noise, so its rows stand beside the test table's PeRFlow rows (same seeds, same
samples, same metrics). Log-densities are exact: LFM's by the change of variables of its Euler steps
(``sampler_densities`` on the blockwise field), a flow map's by that of the composed maps.

Methods (``METHODS``):
- ``lfm``: the LFM chain trained from data (``LocalFlowMatchingObjective``), sampled with ``m`` Euler
  steps per block (``m N`` NFE; fewer NFE than blocks is outside its design);
- ``lfm_distilled``: each block distilled into ``distill_steps`` Euler steps of a student block from
  the trained ``lfm`` of the same seed (``LocalFlowDistillationObjective``; starts from its weights);
- ``fmm_lmd`` / ``fmm_emd``: a two-time flow map distilled from the exact teacher (Lagrangian /
  Eulerian); ``fmm_direct``: the direct flow-map-matching loss from data, no teacher.

Cost columns: FLOPs and autograd-saved MiB of one training step (``ablation.step_cost``), and FLOPs
per generated sample at each NFE (forward only, counted the same way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from marflow_core import (
    BlockwiseField,
    FlowMapDistillationObjective,
    FlowMapMatchingObjective,
    LocalFlowChain,
    LocalFlowDistillationObjective,
    LocalFlowMatchingObjective,
    TwoTimeMLP,
    compose,
    compose_with_logdet,
    load_checkpoint,
    odeint_fixed,
    stream,
    uniform_grid,
)
from marflow_core import train as train_loop
from marflow_core.errors import InvalidParameter

from ..common import fingerprint
from ..common.runs import check_run_dir, prepare_run_dir
from ..common.stats import standard_normal_log_prob
from ..config import ConfigError, require
from .config import EvalConfig, Toy2DConfig, TrainStageConfig
from .evaluate import SLICED, density_status, eval_noise, reference_samples
from .metrics import MapDensities, as_row, kl_tv, mode_mass, sampler_densities, sliced_wasserstein

METHODS: dict[str, str] = {
    "lfm": "Local Flow Matching, trained from data (Euler steps per block)",
    "lfm_distilled": "LFM, each block distilled to few Euler steps",
    "fmm_lmd": "flow map, Lagrangian distillation from the teacher",
    "fmm_emd": "flow map, Eulerian distillation from the teacher",
    "fmm_direct": "flow map, direct loss from data (no teacher)",
}
#: what a method needs before its own training (the cost a reader adds to its per-step cost)
PREREQUISITE: dict[str, str] = {"lfm": "none (data)", "lfm_distilled": "the trained lfm chain",
                                "fmm_lmd": "the teacher", "fmm_emd": "the teacher",
                                "fmm_direct": "none (data)"}
RELATED_MODULE = "replication.toy2d.related"


@dataclass
class RelatedConfig:
    """The ``toy2d_related`` section: ``methods`` on the first ``n_seeds`` test seeds; LFM's OU
    ``ou_steps`` (``N = len + 1`` blocks, the last to ``N(0, I)``), its students' ``distill_steps``
    Euler steps per block and the RK4 ``teacher_steps`` per block of their targets; the test-table
    students shown beside them (``reference_students``, read from ``results/toy2d/test``)."""

    n_seeds: int = 5
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ou_steps: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.8])
    distill_steps: int = 1
    teacher_steps: int = 8
    reference_students: list[str] = field(default_factory=lambda: ["perflow", "perflow_ma"])

    def validate(self, where: str) -> None:
        require(self.n_seeds >= 2, f"{where}.n_seeds", self.n_seeds, "need >= 2 seeds for an interval")
        require(len(self.methods) >= 1, f"{where}.methods", self.methods, "list at least one method")
        for i, name in enumerate(self.methods):
            require(name in METHODS, f"{where}.methods[{i}]", name, f"one of {sorted(METHODS)}")
        require(len(set(self.methods)) == len(self.methods), f"{where}.methods", self.methods,
                "a method is listed twice")
        require("lfm_distilled" not in self.methods or "lfm" in self.methods, f"{where}.methods",
                self.methods, "lfm_distilled distils the lfm chain: list lfm too")
        try:
            LocalFlowChain(tuple(self.ou_steps))
        except InvalidParameter as err:
            raise ConfigError(f"{where}.ou_steps = {self.ou_steps}: {err}") from None
        for key in ("distill_steps", "teacher_steps"):
            require(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, f"{where}.{key}",
                    getattr(self, key), "an integer >= 1")

    @property
    def chain(self) -> LocalFlowChain:
        return LocalFlowChain(tuple(self.ou_steps))


def make_model(method: str, config: RelatedConfig, train_cfg: TrainStageConfig, device: str):
    if method.startswith("lfm"):
        return BlockwiseField.mlp(config.chain.n_blocks, 2, train_cfg.model).to(device)
    return TwoTimeMLP.from_config(2, train_cfg.model).to(device)


def make_objective(method: str, config: RelatedConfig, teacher, lfm_chain: BlockwiseField | None = None):
    if method == "lfm":
        return LocalFlowMatchingObjective(config.chain)
    if method == "lfm_distilled":
        return LocalFlowDistillationObjective(lfm_chain, config.distill_steps, config.teacher_steps)
    if method == "fmm_direct":
        return FlowMapMatchingObjective()
    return FlowMapDistillationObjective(teacher, "lagrangian" if method == "fmm_lmd" else "eulerian")


def batch_fn(method: str, teacher, batch_size: int):
    """The batch of a step: exact data samples, or noise for the LFM students (their inputs)."""
    if method == "lfm_distilled":
        return lambda step, gen: torch.randn(batch_size, 2, generator=gen).to(teacher.means.device)
    return lambda step, gen: teacher.sample(batch_size, 1.0, gen)


def run_fingerprint(method: str, seed: int, config: RelatedConfig, train_cfg: TrainStageConfig,
                    toy: Toy2DConfig) -> dict:
    """A run folder's params and code (the import closure of this module)."""
    train = {k: v for k, v in asdict(train_cfg).items()
             if k not in ("students", "ma", "reflow_pairs", "perflow")}
    lfm = ({"ou_steps": config.ou_steps} if method.startswith("lfm") else {}) | (
        {"distill_steps": config.distill_steps, "teacher_steps": config.teacher_steps}
        if method == "lfm_distilled" else {})
    return {"toy2d": asdict(toy), "method": method, "seed": seed, "train": train, **lfm,
            "code": fingerprint.code_digest([RELATED_MODULE])}


def train_method(method: str, seed: int, config: RelatedConfig, train_cfg: TrainStageConfig, toy: Toy2DConfig,
                 teacher, root: Path, progress: bool = False):
    """Train (or resume) ``method`` on ``seed`` into ``root/<method>/seed<seed>``; the model."""
    run = root / method / f"seed{seed}"
    prepare_run_dir(run, run_fingerprint(method, seed, config, train_cfg, toy))
    torch.manual_seed(seed)
    model = make_model(method, config, train_cfg, toy.device)
    chain = None
    if method == "lfm_distilled":
        chain = load_method("lfm", seed, config, train_cfg, toy, root)
        model.load_state_dict(chain.state_dict())
    objective = make_objective(method, config, teacher, chain)
    meta = {"tier": "toy2d", "method": method, "seed": seed}
    train_loop(model, objective, batch_fn(method, teacher, train_cfg.batch_size), train_cfg.train_config(), run,
               progress, desc=f"{method} seed {seed}", meta=meta, seed=seed)
    return load_method(method, seed, config, train_cfg, toy, root)


def load_method(method: str, seed: int, config: RelatedConfig, train_cfg: TrainStageConfig, toy: Toy2DConfig,
                root: Path):
    """The trained model of ``root/<method>/seed<seed>`` in eval mode (refused when stale)."""
    run = root / method / f"seed{seed}"
    check_run_dir(run, run_fingerprint(method, seed, config, train_cfg, toy), "rerun toy2d_related")
    model = make_model(method, config, train_cfg, toy.device)
    load_checkpoint(run / "last.pt", model, {"tier": "toy2d", "method": method, "seed": seed})
    return model.eval().requires_grad_(False)


def densities(method: str, model, config: RelatedConfig, nfe: int, x0: torch.Tensor, teacher) -> MapDensities:
    """Samples and exact ``log q`` / ``log p`` of ``method``'s ``nfe``-evaluation sampler from ``x0``."""
    if method.startswith("lfm"):
        return sampler_densities(model, config.chain.windows, nfe, x0, teacher)
    flow = compose_with_logdet(model, x0, uniform_grid(0.0, 1.0, nfe, x0))
    return MapDensities(flow.x, standard_normal_log_prob(x0) - flow.logdet, teacher.log_prob(flow.x, 1.0),
                        flow.n_folded)


def evaluate_method(method: str, model, config: RelatedConfig, teacher, cfg: EvalConfig) -> list[dict[str, Any]]:
    """One row per NFE, the columns of the test table's per-run rows."""
    x0 = eval_noise(cfg, device=teacher.means.device)
    reference = reference_samples(teacher, cfg)
    rows = []
    for nfe in cfg.nfe:
        dens = densities(method, model, config, nfe, x0, teacher)
        divergences = kl_tv(dens.log_q, dens.log_p)
        modes = mode_mass(dens.y, teacher)
        rows.append(as_row(
            method=method, nfe=nfe, **divergences, status=density_status(divergences, dens.n_folded),
            folded=dens.n_folded / len(x0),
            crosses_windows=method.startswith("lfm") and nfe < config.chain.n_blocks,
            mode_mass_error=modes["mass_error"], off_mode=modes["off_mode"],
            sliced_w2=sliced_wasserstein(dens.y, reference, cfg.sw_projections, _stream(cfg)),
        ))
    return rows


def _stream(cfg: EvalConfig) -> torch.Generator:
    return stream(cfg.seed, SLICED)


def sampling_mflops(method: str, model, config: RelatedConfig, nfe: int, n: int = 256) -> float:
    """Counted MFLOPs per generated sample of the ``nfe``-evaluation sampler (forward, no log-det)."""
    from .ablation import _FlopCount

    x0 = torch.zeros(n, 2)
    with torch.no_grad(), _FlopCount() as counter:
        if method.startswith("lfm"):
            odeint_fixed(model, x0, config.chain.windows.step_grid(nfe, strict=False).to(x0.dtype))
        else:
            compose(model, x0, uniform_grid(0.0, 1.0, nfe, x0))
    return counter.total / n / 1e6
