"""How far the MA term's finite-difference divergence is from its VJP estimate on the SD student.

For probes ``e`` (``(P, B, ...)``) both estimate ``e^T (dv/dx) e``, averaged over the probes: the
VJP one exactly (``marflow_core.divergence.hutchinson_divergence``), the forward difference
``e . (v(x + h e) - v(x)) / h`` (``finite_difference_divergence``, what ``hutchinson_fd`` trains with)
with a bias ``(h / 2) e^T (d^2 v)[e, e] + O(h^2)`` and a rounding error of about ``u |v| / h`` for
unit roundoff ``u`` of the pass precision (2^-11 in fp16, 2^-8 in bf16). Each case reports
``||estimate - reference|| / ||reference||`` over the batch, the reference being the VJP estimate
with the passes in float32 and TF32 off (``pass_precision("fp32")``, the same switches as the
trainer's ``float32_passes``). The field is the trainer's ``StudentVelocity`` at window starts
``x_s = sqrt(abar_s) z + sqrt(1 - abar_s) eps`` (``z``, ``eps`` standard normal) with the captions'
text embeddings; its UNet input is cast to the pass precision, the state stays float32, as in the
trainer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from marflow_core.divergence import finite_difference_divergence, hutchinson_divergence

from .device import DTYPES, describe, is_oom, precision_unsupported, release
from .plan import SmokePlan
from .report import DivergenceCase
from .training import Inputs

VelocityField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def pass_precision(device: torch.device, precision: str) -> Iterator[None]:
    """``fp32``: autocast off, TF32 off for matmuls and convolutions (restored after);
    ``fp16`` / ``bf16``: autocast to that dtype."""
    if precision == "fp32":
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.autocast(device_type=device.type, enabled=False):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    else:
        with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
            yield


def vjp_estimate(field: VelocityField, x: torch.Tensor, t: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``mean_p e_p^T (dv/dx) e_p`` by one vector-Jacobian product per probe set."""
    return hutchinson_divergence(field, x, t, probes)[1]


def fd_estimate(field: VelocityField, x: torch.Tensor, t: torch.Tensor, probes: torch.Tensor,
                step: float) -> torch.Tensor:
    """``(B,)`` ``mean_p e_p . (v(x + step e_p) - v(x)) / step`` (no graph kept)."""
    with torch.no_grad():
        return finite_difference_divergence(field, x, t, probes, step)[1]


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """``||estimate - reference|| / ||reference||`` over the batch (float64)."""
    ref = reference.double()
    return float((estimate.double() - ref).norm() / ref.norm())


def compare(field_for: Callable[[str], VelocityField], x: torch.Tensor, t: torch.Tensor, probes: torch.Tensor,
            fd_steps: list[float], precisions: list[str],
            context_for: Callable[[str], object], reference: str = "fp32",
            unsupported: Callable[[str], str | None] = lambda p: None) -> list[dict]:
    """The reference (VJP in ``reference`` precision), then per precision its VJP estimate (but the
    reference's own) and the forward difference at each step: a list of
    ``{estimator, fd_step, precision, status, reason, rel_error, reference_norm, wall_s}``.
    ``field_for(precision)`` is the field whose passes run in that precision inside
    ``context_for(precision)``; ``unsupported(precision)`` a reason to skip it, or None."""
    with context_for(reference):
        ref = vjp_estimate(field_for(reference), x, t, probes)
    norm = float(ref.double().norm())
    out = []
    for precision in precisions:
        cases = ([("vjp", None)] if precision != reference else []) + [("fd", h) for h in fd_steps]
        why = unsupported(precision)
        for estimator, step in cases:
            row = {"estimator": estimator, "fd_step": step, "precision": precision, "status": "ok",
                   "reason": None, "rel_error": None, "reference_norm": norm}
            tic = time.perf_counter()
            if why is not None:
                row.update(status="skipped", reason=why)
            else:
                try:
                    field = field_for(precision)
                    with context_for(precision):
                        est = (vjp_estimate(field, x, t, probes) if estimator == "vjp"
                               else fd_estimate(field, x, t, probes, step))
                    row["rel_error"] = relative_error(est, ref)
                except Exception as err:  # noqa: BLE001 (recorded)
                    row.update(status="oom" if is_oom(err) else "error", reason=describe(err))
            row["wall_s"] = time.perf_counter() - tic
            out.append(row)
    return out


def student_field_inputs(comps, recipe_ma: dict, batch: int, captions: list[str], device: torch.device,
                         seed: int = 0):
    """``(field_for, x, t, probes)`` for ``compare`` on the SD student of ``comps``."""
    from .. import vp
    from ..objective import StudentVelocity

    windows, target = recipe_ma["student"]["windows"], recipe_ma["perflow"]["target"]
    gen = torch.Generator().manual_seed(seed)
    shape = (comps.vae.config.latent_channels, *_latent_hw(comps, recipe_ma["resolution"]))
    k = torch.arange(batch) % windows
    alphas = comps.alphas_cumprod.to(device)
    tau_s, _ = vp.window_bounds_tau(k, windows, len(alphas))
    abar_s = vp.abar_at(alphas, tau_s.to(device))
    z, eps = torch.randn(batch, *shape, generator=gen), torch.randn(batch, *shape, generator=gen)
    x = vp.vp_marginal(z.to(device), eps.to(device), abar_s).float()
    t = vp.t_from_tau(tau_s, len(alphas)).to(device)
    probe_kind = recipe_ma["ma"]["probe_kind"]
    n_probes = recipe_ma["ma"]["n_probes"]
    if probe_kind == "rademacher":
        probes = torch.randint(0, 2, (n_probes, batch, *shape), generator=gen).float() * 2 - 1
    else:
        probes = torch.randn((n_probes, batch, *shape), generator=gen)
    with torch.no_grad():
        ids = comps.tokenizer([captions[i % len(captions)] for i in range(batch)],
                              max_length=comps.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids.to(device)
        text = comps.text_encoder(ids)[0].float()

    def field_for(precision: str) -> VelocityField:
        return StudentVelocity(comps.student, text, k.to(device), alphas, windows, target,
                               input_dtype=DTYPES[precision])

    return field_for, x, t, probes.to(device)


def _latent_hw(comps, resolution: int) -> tuple[int, int]:
    down = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    return resolution // down, resolution // down


def run_divergence(plan: SmokePlan, recipe_ma: dict, inputs: Inputs, device: torch.device, device_label: str,
                   torch_version: str, log: Callable[[str], None] = print) -> list[DivergenceCase]:
    """Every case of ``plan.divergence``; never raises (a failure to set up is one ``error`` entry)."""
    from ..components import load_components
    from ..inputs import read_caption_folder

    d = plan.divergence
    stamp = {"device": device_label, "torch": torch_version}
    tic = time.perf_counter()
    try:
        comps = load_components(inputs.model_dir, device, torch.float32)
        comps.student.eval()
        recipe = {**recipe_ma, "ma": {**recipe_ma["ma"], "n_probes": d.n_probes}}
        captions = [c for _, c in read_caption_folder(inputs.data_dir)]
        field_for, x, t, probes = student_field_inputs(comps, recipe, d.batch_size, captions, device)
        rows = compare(field_for, x, t, probes, d.fd_steps, d.precisions, lambda p: pass_precision(device, p),
                       unsupported=lambda p: precision_unsupported(device, p))
    except Exception as err:  # noqa: BLE001 (recorded)
        release(device)
        return [DivergenceCase(**stamp, wall_s=time.perf_counter() - tic, status="oom" if is_oom(err) else "error",
                               reason=describe(err), estimator="vjp", fd_step=None, precision="fp32")]
    del comps
    release(device)
    entries = [DivergenceCase(**stamp, **row) for row in rows]
    for e in entries:
        log(f"[gpu_smoke] divergence {e.estimator} {e.precision}"
            + (f" step {e.fd_step:g}" if e.fd_step is not None else "")
            + (f": relative error {e.rel_error:.3g}" if e.rel_error is not None else f": {e.status} ({e.reason})"))
    return entries
