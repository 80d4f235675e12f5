"""Divergence of a velocity field: exact (vectorized Jacobian) and Hutchinson estimates.

``div v(x, t) = tr(dv/dx)``. The exact trace builds all ``D`` rows of the Jacobian in one batched
vector-Jacobian product (``is_grads_batched``), so it costs one vmapped backward pass, not a Python
loop over coordinates; use it for ``D <= 64``. Hutchinson uses ``div v ~ mean_p e_p^T (dv/dx) e_p``
with Rademacher or Gaussian probes ``e_p`` (``E[e e^T] = I``), one batched VJP for all ``P`` probes.
Every function returns ``(v, div)`` so the caller gets the velocity without a second forward pass.
``divergence_fn`` is the one dispatch from a divergence name to such a function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from .models import JacobianField, VelocityField

ProbeKind = Literal["rademacher", "gaussian"]
PROBE_KINDS: tuple[str, ...] = ("rademacher", "gaussian")
DivergenceKind = Literal["exact", "hutchinson", "hutchinson_fd"]
DIVERGENCE_KINDS: tuple[str, ...] = ("exact", "hutchinson", "hutchinson_fd")
#: ``(x, t) -> (v, div)`` with ``v: (B, ...)`` and ``div: (B,)``
DivergenceFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _input_for_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it is already in a graph (training), else a fresh leaf that needs grad."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def batch_jacobian(
    field: VelocityField, x: torch.Tensor, t: torch.Tensor, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, J)`` with ``v: (B, ...)`` and ``J: (B, D, D)``, ``J[b, i, j] = dv_i / dx_j``, ``D = prod(x.shape[1:])``.

    A ``JacobianField`` (``TimeMLP``) computes ``J`` itself by forward propagation; any other field
    gets all ``D`` rows in one batched vector-Jacobian product.
    """
    if isinstance(field, JacobianField) and x.ndim == 2:
        with torch.set_grad_enabled(create_graph):
            v, jac = field.jacobian(x, t)
        return v, jac
    batch, dim = x.shape[0], x[0].numel()
    with torch.enable_grad():
        xg = _input_for_grad(x)
        v = field(xg, t)
        basis = torch.eye(dim, dtype=x.dtype, device=x.device)
        basis = basis.reshape(dim, 1, *x.shape[1:]).expand(dim, batch, *x.shape[1:])
        (rows,) = torch.autograd.grad(
            v, xg, grad_outputs=basis, is_grads_batched=True, create_graph=create_graph
        )
    jac = rows.reshape(dim, batch, dim).transpose(0, 1)  # (B, D_out, D_in)
    if not create_graph:
        v, jac = v.detach(), jac.detach()
    return v, jac


def exact_divergence(
    field: VelocityField, x: torch.Tensor, t: torch.Tensor, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, div v)`` with ``div: (B,)`` the exact Jacobian trace."""
    v, jac = batch_jacobian(field, x, t, create_graph)
    return v, jac.diagonal(dim1=1, dim2=2).sum(-1)


def sample_probes(
    like: torch.Tensor,
    n_probes: int,
    kind: str = "rademacher",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(P, B, ...)`` probes with identity second moment, drawn on CPU for reproducibility."""
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    shape = (n_probes, *like.shape)
    if kind == "rademacher":
        e = torch.randint(0, 2, shape, generator=generator).to(like.dtype) * 2 - 1
    elif kind == "gaussian":
        e = torch.randn(shape, generator=generator, dtype=like.dtype)
    else:
        raise ValueError(f"unknown probe kind {kind!r}; choose one of {PROBE_KINDS}")
    return e.to(like.device)


def hutchinson_divergence(
    field: VelocityField,
    x: torch.Tensor,
    t: torch.Tensor,
    probes: torch.Tensor,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, div_hat)``: ``div_hat = mean_p e_p^T (dv/dx) e_p`` over ``probes: (P, B, ...)``."""
    with torch.enable_grad():
        xg = _input_for_grad(x)
        v = field(xg, t)
        if probes.shape[0] == 1:  # one probe: a plain VJP, without the vmap of batched gradients
            (e_jac,) = torch.autograd.grad(v, xg, grad_outputs=probes[0], create_graph=create_graph)
            e_jac = e_jac[None]
        else:
            (e_jac,) = torch.autograd.grad(
                v, xg, grad_outputs=probes, is_grads_batched=True, create_graph=create_graph
            )
    div = (e_jac * probes).flatten(2).sum(-1).mean(0)
    if not create_graph:
        v, div = v.detach(), div.detach()
    return v, div


def finite_difference_divergence(
    field: VelocityField,
    x: torch.Tensor,
    t: torch.Tensor,
    probes: torch.Tensor,
    step: float,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, div_hat)``: ``div_hat = mean_p e_p . (v(x + step e_p) - v(x)) / step``.

    A forward difference of ``e^T v`` along each probe: bias ``O(step)`` against the Hutchinson
    estimate (zero for a linear field), no vector-Jacobian product, so its parameter gradient
    needs only a first-order backward (any attention kernel works). ``x`` and the ``P * B`` shifted
    points go through ``field`` as one batch of ``(P + 1) B`` (the field must treat rows
    independently, as every velocity field here does).
    """
    n_probes, b = probes.shape[0], x.shape[0]
    with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
        shifted = (x[None] + step * probes).flatten(0, 1)
        both = field(torch.cat([x, shifted]), torch.cat([t, t.repeat(n_probes)]))  # one batched pass
        v, v_shift = both[:b], both[b:].view(n_probes, *x.shape)
        div = ((v_shift - v[None]) * probes).flatten(2).sum(-1).mean(0) / step
    if not create_graph:
        v, div = v.detach(), div.detach()
    return v, div


def divergence_fn(
    field: VelocityField,
    kind: str = "exact",
    n_probes: int = 1,
    probe_kind: str = "rademacher",
    create_graph: bool = False,
    like: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    fd_step: float = 1e-3,
    probes: torch.Tensor | None = None,
) -> DivergenceFn:
    """The ``(x, t) -> (v, div)`` function of divergence ``kind``; Hutchinson probes ``(P, B, ...)``
    are drawn once here (shaped like ``like``) and stay fixed for every call, e.g. over an ODE solve.
    ``fd_step`` is the finite-difference step of ``hutchinson_fd``. Given ``probes`` (``(P, B, ...)``,
    e.g. drawn per sample by the caller) are used instead of drawing from ``generator``."""
    if kind == "exact":
        return lambda x, t: exact_divergence(field, x, t, create_graph)
    if kind in ("hutchinson", "hutchinson_fd"):
        if like is None and probes is None:
            raise ValueError("Hutchinson divergence needs `like` to size its probes")
        if probes is None:
            probes = sample_probes(like, n_probes, probe_kind, generator)
        if kind == "hutchinson_fd":
            return lambda x, t: finite_difference_divergence(field, x, t, probes, fd_step, create_graph)
        return lambda x, t: hutchinson_divergence(field, x, t, probes, create_graph)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCE_KINDS}")
