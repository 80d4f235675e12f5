"""The training loop shared by every method: seeded, resumable, atomic checkpoints, finite losses.

Randomness of step ``s`` comes from a generator seeded by ``(seed, s)``, so an interrupted run
resumed from its last checkpoint is bit-identical to an uninterrupted one (same device, same threads).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .atomic import atomic_torch_save
from .errors import CheckpointError, InvalidParameter, NonFiniteLossError
from .integrity import non_finite_tensors, verified_load, with_digest
from .objectives import Objective
from .seeding import stream

LAST_CHECKPOINT = "last.pt"
__all__ = ["CheckpointError", "NonFiniteLossError", "TrainConfig", "TrainResult", "load_checkpoint",
           "step_generator", "train"]


OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")


@dataclass
class TrainConfig:
    """The one optimizer config of the code base: every tier's training section extends it.

    ``steps`` optimizer steps of ``optimizer`` (``adam`` or ``adamw``, with ``betas``, ``eps`` and
    ``weight_decay``; Adam's weight decay is L2, AdamW's decoupled) at learning rate ``lr`` on
    batches of ``batch_size``; ``warmup`` steps of linear learning-rate warm-up, then constant;
    ``grad_clip`` <= 0 disables gradient-norm clipping. Checkpoints every ``checkpoint_every`` steps;
    ``snapshot_every`` > 0 also keeps ``step_XXXXXXX.pt`` files (for checkpoint selection). A loss
    term larger than ``loss_limit`` in magnitude counts as diverged (an exploding divergence
    estimate, say) and stops training like a NaN. The run's seed is not an optimizer setting: it is
    an argument of ``train``.
    """

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 0
    grad_clip: float = 1.0
    optimizer: str = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    checkpoint_every: int = 500
    snapshot_every: int = 0
    log_every: int = 50
    loss_limit: float = 1e8

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "checkpoint_every", "log_every", "lr", "eps", "loss_limit"):
            if not getattr(self, key) > 0:
                raise InvalidParameter(key, getattr(self, key), "must be > 0")
        for key in ("snapshot_every", "warmup", "weight_decay"):
            if getattr(self, key) < 0:
                raise InvalidParameter(key, getattr(self, key), "must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidParameter("optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise InvalidParameter("betas", self.betas, "two numbers in [0, 1)")

    def train_config(self) -> TrainConfig:
        """The optimizer fields alone, as a plain ``TrainConfig`` (a tier section that extends this
        class carries more; checkpoints record only these)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})

    def make_optimizer(self, parameters) -> torch.optim.Optimizer:
        """``torch.optim.Adam`` or ``AdamW`` with these settings."""
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return cls(parameters, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                   weight_decay=self.weight_decay)

    def lr_at(self, step: int) -> float:
        """The learning rate of (0-based) ``step``: linear warm-up over ``warmup`` steps, then ``lr``."""
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    resumed_from: int = 0


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step: the ``train-step`` stream of ``seed``, a function of ``(seed, step)``."""
    return stream(seed, "train-step", step)


def canonical(obj):
    """``obj`` with every string interned, recursively through dicts, lists and tuples.

    Pickle memoises strings by identity, so equal states whose strings came from different places
    (code literals in a fresh run, unpickled keys after a resume) would serialise to different
    bytes; interned, they serialise identically, and a resumed run's checkpoint files are
    byte-identical to an uninterrupted run's (DVC hashes them).
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        out = type(obj)((canonical(k), canonical(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state dict's version information
            out._metadata = obj._metadata
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(canonical(v) for v in obj)
    return obj


def _save(path: Path, model: nn.Module, optimizer, step: int, history, config: TrainConfig,
          seed: int, meta: dict | None) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "history": history, "config": asdict(config.train_config()), "seed": seed, "meta": meta}
    atomic_torch_save(canonical(with_digest(state)), path)


def load_checkpoint(path: str | Path, model: nn.Module, meta: dict | None = None) -> dict:
    """Load a checkpoint's weights into ``model``; returns the whole checkpoint dict.

    Refuses, with ``CheckpointError`` naming the file, one that cannot be read (truncated, not a
    checkpoint), one whose tensors no longer match the content digest saved with them (bytes
    changed inside a file that still opens, ``integrity``), one with non-finite weights, one whose
    weights do not fit ``model`` (another architecture), and, when ``meta`` is given, one made for
    other ``meta`` (another method, say).
    """
    path = Path(path)
    state = verified_load(path)
    if not {"model", "step", "history"} <= state.keys():
        raise CheckpointError(f"{path}: not a marflow training checkpoint")
    bad = non_finite_tensors(state["model"])
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values "
                              f"({bad[0].lstrip('/')}, ...): the run diverged before it was saved; "
                              f"delete it and rerun the run that wrote it")
    if meta is not None and state.get("meta") != meta:
        raise CheckpointError(f"{path}: made for {state.get('meta')}, not for {meta}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{path}: its weights do not fit this model ({detail})") from None
    return state


def _first_term_gradient(model: nn.Module, terms) -> list[torch.Tensor | None]:
    """The gradient of ``terms.first_term`` alone (the graph kept for the total's backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(terms.first_term, params, retain_graph=True, allow_unused=True))


def _gradient_norms(model: nn.Module, first: list[torch.Tensor | None]) -> dict[str, float]:
    """``grad_norm_tm`` (the first term's) and ``grad_norm_ma`` (the rest: total minus first), before
    clipping, from the accumulated ``.grad`` of the total."""
    params = [p for p in model.parameters() if p.requires_grad]
    sq_first = sq_rest = 0.0
    for p, g in zip(params, first, strict=True):
        total = p.grad if p.grad is not None else torch.zeros_like(p)
        g = torch.zeros_like(p) if g is None else g
        sq_first += float(g.pow(2).sum())
        sq_rest += float((total - g).pow(2).sum())
    return {"grad_norm_tm": math.sqrt(sq_first), "grad_norm_ma": math.sqrt(sq_rest)}


def _evaluated(model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
    """``evaluate(model)`` in eval mode under ``no_grad``, the model put back in train mode."""
    model.eval()
    try:
        with torch.no_grad():
            values = {k: float(v) for k, v in evaluate(model).items()}
    finally:
        model.train()
    return values


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of atomic writes that a killed process left in ``folder``."""
    stale = sorted(folder.glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def train(
    model: nn.Module,
    objective: Objective,
    batch_fn: Callable[[int, torch.Generator], object],
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
    meta: dict | None = None,
    seed: int = 0,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainResult:
    """Optimize ``objective`` for ``config.steps`` steps, resuming from ``checkpoint_dir/last.pt``.

    ``batch_fn(step, generator)`` returns the data batch of a step; the randomness of step ``s`` is
    the ``train-step`` stream of ``(seed, s)``. ``meta`` (plain values: the
    method, its windows, ...) is stored in every checkpoint, and a checkpoint with other ``meta`` is
    refused at resume (``CheckpointError``). Raises ``NonFiniteLossError`` naming the step and the
    loss parts; the last good checkpoint is kept. Temporary files of a killed checkpoint write are
    deleted at start: a half-written file is never loaded.

    ``evaluate(model)``, when given, runs after the update of every logged step, in eval mode and
    without gradients, and its values (held-out losses, say) join that step's history entry; it
    must draw no randomness of its own outside a fixed generator, so that training is unchanged.
    """
    optimizer = config.make_optimizer(model.parameters())
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, history = 0, []
    if ckpt_dir is not None and ckpt_dir.exists():
        remove_stale_temporaries(ckpt_dir)
    if ckpt_dir is not None and (ckpt_dir / LAST_CHECKPOINT).exists():
        state = load_checkpoint(ckpt_dir / LAST_CHECKPOINT, model, meta)
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
    result = TrainResult(steps=start, history=history, resumed_from=start)
    tic = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc=desc, disable=not progress, initial=start,
               total=config.steps, mininterval=5.0)
    model.train()
    for step in bar:
        generator = step_generator(seed, step)
        try:
            terms = objective(model, batch_fn(step, generator), step, generator)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{desc}: step {step}: {err}; stopped before the update, last "
                                     f"good checkpoint kept in {ckpt_dir}") from None
        if not all(math.isfinite(v) for v in terms.parts.values()):
            raise NonFiniteLossError(
                f"{desc}: non-finite loss at step {step}: {terms.parts}; stopped before the update, "
                f"last good checkpoint kept in {ckpt_dir}"
            )
        exploded = {k: v for k, v in terms.parts.items() if abs(v) > config.loss_limit}
        if exploded:
            raise NonFiniteLossError(
                f"{desc}: loss exploded at step {step}: {exploded} exceeds loss_limit "
                f"{config.loss_limit:g}; stopped before the update, last good checkpoint kept in "
                f"{ckpt_dir}")
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        logged = done % config.log_every == 0 or done == config.steps
        split = _first_term_gradient(model, terms) if logged and terms.first_term is not None else None
        terms.total.backward()
        if split is not None:  # the rest's gradient is the total's minus the first term's
            terms.parts.update(_gradient_norms(model, split))
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"{desc}: non-finite gradient norm at step {step} (loss {terms.parts}); stopped "
                f"before the update, last good checkpoint kept in {ckpt_dir}"
            )
        if config.warmup:
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
        optimizer.step()
        if logged:
            if evaluate is not None:
                terms.parts.update(_evaluated(model, evaluate))
            history.append({"step": done, **terms.parts})
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.parts.items()}, refresh=False)
        if ckpt_dir is not None:  # the snapshot first: once last.pt says `done`, its snapshot exists
            if config.snapshot_every and done % config.snapshot_every == 0:
                _save(ckpt_dir / f"step_{done:07d}.pt", model, optimizer, done, history, config, seed,
                      meta)
            if done % config.checkpoint_every == 0 or done == config.steps:
                _save(ckpt_dir / LAST_CHECKPOINT, model, optimizer, done, history, config, seed, meta)
    model.eval()
    result.steps = config.steps
    result.wall_seconds = time.perf_counter() - tic
    return result
