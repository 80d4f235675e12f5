"""Seconds per step and peak memory of the real trainer (``replication.sd15.train.train``) for each
training case of the plan, each batch size, with gradient checkpointing.

A case is the ``sd15_train`` (PeRFlow + MA) or ``sd15_train_perflow`` (PeRFlow) section of the GPU
params with the plan's ``train_overrides`` and the case's batch size, precision and ``ma_fd_fp32``,
trained for ``warmup_steps + timed_steps`` steps without checkpoints or a saved pipeline
(``train(..., save=False)``) and timed from the trainer's own log. Out of memory is recorded
(``oom: true``) and the run goes on; the larger batch sizes of that case are then skipped. Batch
sizes run in ascending order across cases, so every case has its smallest batch measured before
any case tries a large one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import deep_merge, from_dict
from ..config import SD15TrainConfig
from .device import (
    allocated_mb,
    describe,
    is_oom,
    peak_memory_kind,
    release,
    reset_peak,
    trainer_precision_unsupported,
)
from .plan import SmokePlan, TrainCasePlan
from .report import TrainCase

MA_SECTION, PERFLOW_SECTION = "sd15_train", "sd15_train_perflow"
TrainFn = Callable[..., Any]


@dataclass(frozen=True)
class Inputs:
    """The folders a run built: the pipeline (teacher and student init) and the captions."""

    model_dir: Path
    data_dir: Path
    work_dir: Path


def recipe_section(recipe: dict[str, Any], ma: bool) -> dict[str, Any]:
    """The training section a case starts from."""
    name = MA_SECTION if ma else PERFLOW_SECTION
    if name not in recipe:
        raise KeyError(f"the GPU params have no {name} section, which the smoke run's "
                       f"{'MA' if ma else 'PeRFlow'} cases start from")
    return recipe[name]


def case_section(recipe: dict[str, Any], plan: SmokePlan, ma: bool, mixed_precision: str, batch_size: int,
                 ma_fd_fp32: bool | None, out: Path, inputs: Inputs, steps: int,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``sd15_train`` section of one case as a params file holds it: the recipe's section, the
    plan's ``train_overrides``, ``extra``, then the case's own keys (``ma_fd_fp32`` None: the
    recipe's value; the keys without effect at this precision dropped)."""
    base = recipe_section(recipe, ma)
    section = deep_merge(deep_merge(base, plan.train_overrides), extra or {})
    section.update(model_dir=str(inputs.model_dir), data_dir=str(inputs.data_dir), output_dir=str(out),
                   steps=steps, batch_size=batch_size, grad_accum=1, mixed_precision=mixed_precision,
                   gradient_checkpointing=plan.gradient_checkpointing, log_every=1, debug_dump=None)
    fd_fp32 = section.pop("ma_fd_fp32", None) if ma_fd_fp32 is None else ma_fd_fp32
    skips = section.pop("max_overflow_skips", SD15TrainConfig.max_overflow_skips)
    if ma and mixed_precision != "no":
        section["ma_fd_fp32"] = bool(fd_fp32)
    if mixed_precision == "fp16":
        section["max_overflow_skips"] = skips
    return section


def case_config(*args, where: str = "gpu_smoke", **kwargs) -> SD15TrainConfig:
    """The validated ``SD15TrainConfig`` of ``case_section(*args, **kwargs)``."""
    return from_dict(SD15TrainConfig, case_section(*args, **kwargs), where, complete=True)


def read_log(out: Path) -> list[dict]:
    path = out / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _entry(name: str, case: TrainCasePlan, batch: int, plan: SmokePlan, stamp: dict, **kw) -> TrainCase:
    return TrainCase(name=name, method="perflow_ma" if case.ma else "perflow",
                     mixed_precision=case.mixed_precision, ma_fd_fp32=case.ma_fd_fp32, batch_size=batch,
                     gradient_checkpointing=plan.gradient_checkpointing, warmup_steps=plan.warmup_steps,
                     timed_steps=plan.timed_steps, **stamp, **kw)


def run_case(name: str, case: TrainCasePlan, batch: int, plan: SmokePlan, recipe: dict, inputs: Inputs,
             device, device_label: str, torch_version: str, train_fn: TrainFn) -> TrainCase:
    """Train one case at one batch size; never raises (an exception is the entry's ``reason``)."""
    stamp = {"device": device_label, "torch": torch_version}
    unsupported = trainer_precision_unsupported(device, case.mixed_precision)
    if unsupported is not None:
        return _entry(name, case, batch, plan, {**stamp, "wall_s": 0.0}, status="skipped", oom=False,
                      reason=unsupported)
    out = inputs.work_dir / "train" / f"{name}_b{batch}"
    steps = plan.warmup_steps + plan.timed_steps
    tic = time.perf_counter()
    status, reason, oom, start = "ok", None, False, None
    try:
        cfg = case_config(recipe, plan, case.ma, case.mixed_precision, batch, case.ma_fd_fp32, out, inputs,
                          steps, where=f"gpu_smoke case {name}")
        start = allocated_mb(device)
        reset_peak(device)
        train_fn(cfg, progress=False, save=False)
    except Exception as err:  # noqa: BLE001 (recorded; the run goes on with the next case)
        oom = is_oom(err)
        status, reason = ("oom" if oom else "error"), describe(err)
    finally:
        release(device)
    wall = time.perf_counter() - tic
    rows = read_log(out)
    timed = [r for r in rows if r["step"] > plan.warmup_steps]
    entry = _entry(name, case, batch, plan, {**stamp, "wall_s": wall}, status=status, reason=reason, oom=oom,
                   step_seconds=[r["sec_per_step"] for r in rows], losses=[r["total"] for r in rows],
                   start_memory_mb=start)
    if rows:
        entry.overflow_skips = rows[-1]["overflow_skips"]
        entry.peak_memory_mb = max(r["peak_memory_mb"] for r in rows)
        entry.peak_memory_kind = peak_memory_kind(device)
    if status == "ok":
        if len(timed) != plan.timed_steps:
            entry.status, entry.reason = "failed", f"logged {len(rows)} steps, expected {steps}"
        else:
            entry.sec_per_step = sum(r["sec_per_step"] for r in timed) / len(timed)
            entry.sec_per_sample = entry.sec_per_step / batch
    return entry


def schedule(plan: SmokePlan) -> list[tuple[str, TrainCasePlan, int]]:
    """``(case name, case, batch size)`` in run order: ascending batch size, then the plan's order."""
    runs = [(name, case, batch) for name, case in plan.cases.items() for batch in sorted(case.batch_sizes)]
    order = {name: i for i, name in enumerate(plan.cases)}
    return sorted(runs, key=lambda r: (r[2], order[r[0]]))


def run_cases(plan: SmokePlan, recipe: dict, inputs: Inputs, device, device_label: str, torch_version: str,
              elapsed: Callable[[], float], on_entry: Callable[[TrainCase], None],
              train_fn: TrainFn | None = None, log: Callable[[str], None] = print) -> list[TrainCase]:
    """Every case of ``schedule(plan)``; ``on_entry`` sees each entry as it is made (the caller
    rewrites the report); a case starts only while ``elapsed() < plan.train_budget_s``."""
    if train_fn is None:
        from ..train import train as train_fn
    entries: list[TrainCase] = []
    oom_at: dict[str, int] = {}
    for name, case, batch in schedule(plan):
        stamp = {"device": device_label, "torch": torch_version, "wall_s": 0.0}
        if name in oom_at:
            entry = _entry(name, case, batch, plan, stamp, status="skipped", oom=False,
                           reason=f"batch {oom_at[name]} of this case ran out of memory")
        elif elapsed() >= plan.train_budget_s:
            entry = _entry(name, case, batch, plan, stamp, status="skipped", oom=False,
                           reason=f"train_budget_s = {plan.train_budget_s:g} s used up before this case")
        else:
            log(f"[gpu_smoke] train {name} batch {batch} ...")
            entry = run_case(name, case, batch, plan, recipe, inputs, device, device_label, torch_version, train_fn)
            if entry.oom:
                oom_at[name] = batch
        log(f"[gpu_smoke] train {name} batch {batch}: {entry.status}"
            + (f", {entry.sec_per_step:.3f} s/step" if entry.sec_per_step is not None else "")
            + (f", peak {entry.peak_memory_mb:.0f} MB" if entry.peak_memory_mb is not None else "")
            + (f" ({entry.reason})" if entry.reason else ""))
        entries.append(entry)
        on_entry(entry)
    return entries
