"""Divergence of a velocity field: exact (Jacobian) and Hutchinson estimates.

``div v(x, t) = tr(dv/dx)``. Hutchinson uses ``div v ~ mean_p e_p^T (dv/dx) e_p`` with Rademacher
or Gaussian probes ``e_p`` (``E[e e^T] = I``), one batched VJP for all ``P`` probes. Every function
returns ``(v, div)`` so the caller gets the velocity without a second forward pass.
``divergence_fn`` is the one dispatch from a divergence name to such a function.

How the exact Jacobian ``J: (B, D, D)`` is computed (``batch_jacobian``, ``exact_divergence``;
argument ``method``, default the context's ``default_jacobian_method``, itself ``"auto"``):

* ``"reverse"``: all ``D`` rows in one batched vector-Jacobian product (``is_grads_batched``), any
  field whose rows are independent.
* ``"forward"``: the ``D`` columns in forward mode. A ``JacobianField`` (``TimeMLP``, 2-D ``x``)
  supplies ``J`` itself (hand-propagated, one GEMM per layer); any other field goes through the
  tangent engine of ``forward_jacobian`` (every column in one pass, ``chunk_size`` columns at a time
  to bound memory; the trace alone skips the last linear layer's GEMM), or, for an op that engine
  has no rule for, ``torch.func.jvp`` under ``vmap``.
* ``"auto"`` (the default) picks, per field (decisions cached per field object and train/eval
  mode; a plain function wrapping a module is one object, so build a new one after ``.train()``
  / ``.eval()``): a ``JacobianField``'s own Jacobian; reverse mode for ``D < FORWARD_MIN_DIM``
  (4); else, once ``rows_independent`` holds (checked once on a few rows: per-row ``vmap`` agrees
  with the batch, so not BatchNorm in training mode, no in-place state updates, no randomness, no
  coupling across rows), the tangent engine; if an op lacks a rule there (and for convolutions
  on CPU without ``create_graph``, where convolution backward kernels are faster), ``torch.func``
  forward mode when ``create_graph`` (it still beats the double backward) and reverse mode
  otherwise; reverse mode for a field that fails the check. ``benchmarks/README.md`` has the
  timings behind these choices.

All give the same values to round-off; with ``create_graph`` every one is differentiable in the
parameters (forward mode: reverse over forward).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch

from .forward_jacobian import UnsupportedOp, functorch_columns, rows_independent, tangent_columns
from .models import JacobianField, VelocityField

ProbeKind = Literal["rademacher", "gaussian"]
PROBE_KINDS: tuple[str, ...] = ("rademacher", "gaussian")
DivergenceKind = Literal["exact", "hutchinson", "hutchinson_fd"]
DIVERGENCE_KINDS: tuple[str, ...] = ("exact", "hutchinson", "hutchinson_fd")
JacobianMethod = Literal["auto", "forward", "reverse"]
JACOBIAN_METHODS: tuple[str, ...] = ("auto", "forward", "reverse")
#: ``(x, t) -> (v, div)`` with ``v: (B, ...)`` and ``div: (B,)``
DivergenceFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: ``auto`` takes reverse mode below this many columns: at ``D = 2`` both cost about the same per
#: column pair and reverse mode has no per-op Python overhead (faster at small batches)
FORWARD_MIN_DIM = 4

_DEFAULT_METHOD: ContextVar[str] = ContextVar("marflow_jacobian_method", default="auto")


@contextmanager
def default_jacobian_method(method: str) -> Iterator[None]:
    """Within the block, ``method=None`` means ``method`` (e.g. to time reverse against forward mode
    through code that does not pass ``method`` on, such as a training step)."""
    _check_method(method)
    token = _DEFAULT_METHOD.set(method)
    try:
        yield
    finally:
        _DEFAULT_METHOD.reset(token)


def _check_method(method: str) -> None:
    if method not in JACOBIAN_METHODS:
        raise ValueError(f"unknown Jacobian method {method!r}; choose one of {JACOBIAN_METHODS}")


def _input_for_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it is already in a graph (training), else a fresh leaf that needs grad."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def reverse_jacobian(
    field: VelocityField, x: torch.Tensor, t: torch.Tensor, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, J)``: all ``D`` rows of ``J`` in one batched vector-Jacobian product."""
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


# per field object (weakly) and train/eval mode:
# {"rows": bool, ("tangent", create_graph): bool, "functorch": bool}
_DECISIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decisions(field: VelocityField) -> dict:
    """The cached decisions of ``field`` in its current train/eval mode (a fresh dict, used for
    one call only, when the field cannot be weakly referenced)."""
    try:
        per_field = _DECISIONS.setdefault(field, {})
    except TypeError:
        return {}
    return per_field.setdefault(getattr(field, "training", None), {})


def _plan(field, x, t, method: str, create_graph: bool, decided: dict) -> str:
    if method == "reverse":
        return "reverse"
    if isinstance(field, JacobianField) and x.ndim == 2:
        return "jacobian_field"
    if method == "auto":
        if x[0].numel() < FORWARD_MIN_DIM:
            return "reverse"
        if "rows" not in decided:
            decided["rows"] = rows_independent(field, x, t)
        if not decided["rows"]:
            return "reverse"
    if decided.get(("tangent", create_graph), True):
        return "tangent"
    if method == "forward" or (create_graph and decided.get("functorch", True)):
        return "functorch"
    return "reverse"


def _method(method: str | None) -> str:
    method = _DEFAULT_METHOD.get() if method is None else method
    _check_method(method)
    return method


def jacobian_plan(
    field: VelocityField, x: torch.Tensor, t: torch.Tensor, method: str | None = None,
    create_graph: bool = False,
) -> str:
    """The path ``batch_jacobian`` takes now: ``"jacobian_field"``, ``"tangent"``, ``"functorch"``
    or ``"reverse"`` (a field whose op the tangent engine has no rule for is found out on its first
    call, and takes the next path from then on)."""
    return _plan(field, x, t, _method(method), create_graph, _decisions(field))


def _run(
    field: VelocityField, x: torch.Tensor, t: torch.Tensor, create_graph: bool, method: str | None,
    chunk_size: int | None, trace_only: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, J)`` or, with ``trace_only``, ``(v, tr J)`` by the planned path; a failed forward-mode
    path is recorded and the next one taken."""
    method = _method(method)
    decided = _decisions(field)
    while True:
        plan = _plan(field, x, t, method, create_graph, decided)
        try:
            with torch.set_grad_enabled(create_graph):
                if plan == "tangent":
                    return tangent_columns(field, x, t, chunk_size, trace_only)
                if plan == "jacobian_field":
                    v, jac = field.jacobian(x, t)
                elif plan == "functorch":
                    v, jac = functorch_columns(field, x, t, chunk_size)
                else:
                    v, jac = reverse_jacobian(field, x, t, create_graph)
        except UnsupportedOp:
            decided[("tangent", create_graph)] = False
            continue
        except (RuntimeError, NotImplementedError):  # e.g. an op without a forward-mode formula
            if plan != "functorch" or method == "forward":
                raise
            decided["functorch"] = False
            continue
        return (v, jac.diagonal(dim1=1, dim2=2).sum(-1)) if trace_only else (v, jac)


def batch_jacobian(
    field: VelocityField, x: torch.Tensor, t: torch.Tensor, create_graph: bool = False,
    method: str | None = None, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, J)`` with ``v: (B, ...)`` and ``J: (B, D, D)``, ``J[b, i, j] = dv_i / dx_j``, ``D = prod(x.shape[1:])``.

    ``method``: ``"auto"``, ``"forward"`` or ``"reverse"`` (module docstring; None: the context's
    default). ``chunk_size``: Jacobian columns per forward-mode pass (None: all ``D``).
    With ``create_graph`` the result is differentiable (training); otherwise detached.
    """
    return _run(field, x, t, create_graph, method, chunk_size, trace_only=False)


def exact_divergence(
    field: VelocityField, x: torch.Tensor, t: torch.Tensor, create_graph: bool = False,
    method: str | None = None, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, div v)`` with ``div: (B,)`` the exact Jacobian trace (``method``, ``chunk_size``: as
    ``batch_jacobian``)."""
    return _run(field, x, t, create_graph, method, chunk_size, trace_only=True)


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
    jacobian_method: str | None = None,
) -> DivergenceFn:
    """The ``(x, t) -> (v, div)`` function of divergence ``kind``; Hutchinson probes ``(P, B, ...)``
    are drawn once here (shaped like ``like``) and stay fixed for every call, e.g. over an ODE solve.
    ``fd_step`` is the finite-difference step of ``hutchinson_fd``. Given ``probes`` (``(P, B, ...)``,
    e.g. drawn per sample by the caller) are used instead of drawing from ``generator``.
    ``jacobian_method``: how the exact trace is computed (``exact_divergence``'s ``method``)."""
    if kind == "exact":
        return lambda x, t: exact_divergence(field, x, t, create_graph, jacobian_method)
    if kind in ("hutchinson", "hutchinson_fd"):
        if like is None and probes is None:
            raise ValueError("Hutchinson divergence needs `like` to size its probes")
        if probes is None:
            probes = sample_probes(like, n_probes, probe_kind, generator)
        if kind == "hutchinson_fd":
            return lambda x, t: finite_difference_divergence(field, x, t, probes, fd_step, create_graph)
        return lambda x, t: hutchinson_divergence(field, x, t, probes, create_graph)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCE_KINDS}")
