"""Flow map matching (Boffi, Albergo, Vanden-Eijnden, arXiv 2406.07507), in this suite's conventions.

A two-time flow map ``X_{s,t}(x) = x + (t - s) u(x, s, t)`` carries a point from time ``s`` to time ``t``
of the teacher's probability-flow ODE ``dx/dt = b(x, t)`` (``t = 0`` noise, ``t = 1`` data). The form
makes ``X_{s,s} = id`` hold by construction, and ``u(x, t, t)`` is the velocity ``b(x, t)`` at the
optimum. The exact map obeys two equations, each a distillation loss from a teacher velocity ``b``:

- Lagrangian (LMD): ``d/dt X_{s,t}(x) = b(X_{s,t}(x), t)``,
  ``L_LMD = E || d_t X_{s,t}(x_s) - b(X_{s,t}(x_s), t) ||^2`` with ``x_s ~ p_s``;
- Eulerian (EMD): ``d/ds X_{s,t}(x) + (grad_x X_{s,t}(x)) b(x, s) = 0``; the left side is the
  directional derivative of ``(x, s) -> X_{s,t}(x)`` along ``(b(x, s), 1)``, one ``jvp``.

The direct loss (no teacher; data ``x1`` and noise ``x0``, interpolant ``I_t = (1 - t) x0 + t x1``):
``L = E || d_t X_{s,t}(X_{t,s}(I_t)) - dI_t/dt ||^2 + || X_{s,t}(X_{t,s}(I_t)) - I_t ||^2``, a
Lagrangian consistency term (the composed map's time derivative regresses the interpolant's velocity)
plus invertibility (``X_{s,t}`` inverts ``X_{t,s}``). Time derivatives are forward-mode
(``torch.func.jvp``). Sampling composes maps over a grid; the exact log-density of the composition is
the change of variables, ``log q(y) = log p(x) - sum_i log|det grad X_{t_i, t_{i+1}}(x_i)|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn
from torch.func import jacrev, jvp, vmap

from .errors import InvalidParameter, NonFiniteLossError, require_finite
from .logdensity import FlowWithLogDet
from .models import SinusoidalTimeEmbedding, TimeMLPConfig, as_batch_time, expand_time
from .objectives import LossTerms
from .teachers import Teacher

DistillationKind = Literal["lagrangian", "eulerian"]
DISTILLATION_KINDS: tuple[str, ...] = ("lagrangian", "eulerian")


class FlowMap(Protocol):
    """``X(x, s, t)``: ``x: (B, ...)``, ``s, t: (B,)`` -> ``(B, ...)``, the point at time ``t`` of the
    trajectory through ``x`` at time ``s``."""

    def __call__(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class TwoTimeMLP(nn.Module):
    """``X_{s,t}(x) = x + (t - s) MLP([x, emb(s), emb(t)])`` for low-dimensional ``x: (B, D)``.

    The same widths and SiLU activations as ``TimeMLP``; the two times share one sinusoidal embedding.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32) -> None:
        super().__init__()
        TimeMLPConfig(hidden, depth, time_dim)
        if dim < 1:
            raise InvalidParameter("dim", dim, "must be >= 1")
        self.dim = dim
        self.time_embedding = SinusoidalTimeEmbedding(time_dim)
        layers: list[nn.Module] = []
        width_in = dim + 2 * time_dim
        for _ in range(depth):
            layers += [nn.Linear(width_in, hidden), nn.SiLU()]
            width_in = hidden
        layers.append(nn.Linear(width_in, dim))
        self.net = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, dim: int, config: TimeMLPConfig) -> TwoTimeMLP:
        return cls(dim, config.hidden, config.depth, config.time_dim)

    def displacement(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``u(x, s, t)``: ``(B, D)``."""
        return self.net(torch.cat([x, self.time_embedding(s), self.time_embedding(t)], dim=-1))

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = as_batch_time(s, x), as_batch_time(t, x)
        return x + expand_time(t - s, x) * self.displacement(x, s, t)


def time_derivative(flow_map: FlowMap, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X_{s,t}(x), d/dt X_{s,t}(x))`` by one forward-mode product (``torch.func.jvp``); ``(B, ...)``."""
    return jvp(lambda tt: flow_map(x, s, tt), (t,), (torch.ones_like(t),))


def eulerian_residual(flow_map: FlowMap, velocity, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor
                      ) -> torch.Tensor:
    """``d_s X_{s,t}(x) + (grad_x X_{s,t}(x)) b(x, s)``: ``(B, ...)``, zero for the exact flow map of ``b``.

    One ``jvp`` of ``(x, s) -> X_{s,t}(x)`` along ``(b(x, s), 1)``; ``b`` is treated as data (no gradient).
    """
    with torch.no_grad():
        b = velocity(x, s)
    return jvp(lambda xx, ss: flow_map(xx, ss, t), (x, s), (b, torch.ones_like(s)))[1]


def sample_times(n: int, generator: torch.Generator | None, dtype: torch.dtype, device,
                 ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)``, each ``(n,)`` uniform on ``[0, 1]`` and independent; ``ordered``: ``s <= t`` (the
    sampling direction, noise to data)."""
    st = torch.rand(2, n, generator=generator, dtype=dtype).to(device)
    if ordered:
        st = st.sort(dim=0).values
    return st[0], st[1]


@dataclass
class FlowMapDistillationObjective:
    """LMD or EMD from a frozen teacher; the batch is ``x1: (B, D)`` data, from which the start points
    ``x_s ~ p_s`` are made by the interpolant (``start_points``).

    ``ordered``: train only ``s <= t`` (the maps the sampler composes); otherwise both directions,
    which the inverse maps of the density need at no extra cost to the sampler.
    """

    teacher: Teacher
    kind: str = "lagrangian"
    ordered: bool = True

    def __post_init__(self) -> None:
        if self.kind not in DISTILLATION_KINDS:
            raise InvalidParameter("kind", self.kind, f"one of {DISTILLATION_KINDS}")

    def start_points(self, x1: torch.Tensor, s: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``x_s = (1 - s) x0 + s x1``, ``x0 ~ N(0, I)`` fresh: its law is the teacher's marginal ``p_s``
        (exactly so for a flow-matching teacher of the linear interpolant, the exact 2-D one included)."""
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        return (1 - expand_time(s, x1)) * x0 + expand_time(s, x1) * x1

    def __call__(self, model: FlowMap, batch: torch.Tensor, step: int,
                 generator: torch.Generator | None) -> LossTerms:
        x1 = batch
        s, t = sample_times(x1.shape[0], generator, x1.dtype, x1.device, self.ordered)
        xs = self.start_points(x1, s, generator)
        if self.kind == "lagrangian":
            x_t, dt_x = time_derivative(model, xs, s, t)
            with torch.no_grad():
                target = self.teacher.velocity(x_t.detach(), t)
            # the gradient flows through d_t X only (the target is the teacher at the map's point, held fixed)
            loss = (dt_x - target).pow(2).flatten(1).sum(-1).mean()
        else:
            loss = eulerian_residual(model, self.teacher.velocity, xs, s, t).pow(2).flatten(1).sum(-1).mean()
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(f"flow-map {self.kind} loss is {float(loss)}")
        return LossTerms(loss, {self.kind[0] + "md": float(loss.detach()), "total": float(loss.detach())})


@dataclass
class FlowMapMatchingObjective:
    """The direct loss from data ``x1: (B, D)`` and fresh noise: Lagrangian consistency of
    ``X_{s,t} o X_{t,s}`` on the interpolant plus ``invertibility_weight`` times its invertibility."""

    invertibility_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.invertibility_weight >= 0:
            raise InvalidParameter("invertibility_weight", self.invertibility_weight, "must be >= 0")

    def __call__(self, model: FlowMap, batch: torch.Tensor, step: int,
                 generator: torch.Generator | None) -> LossTerms:
        x1 = batch
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        s, t = sample_times(x1.shape[0], generator, x1.dtype, x1.device)
        it = (1 - expand_time(t, x1)) * x0 + expand_time(t, x1) * x1
        back = model(it, t, s)  # X_{t,s}(I_t)
        there, dt_there = time_derivative(model, back, s, t)  # X_{s,t}(X_{t,s}(I_t)) and its d/dt
        consistency = (dt_there - (x1 - x0)).pow(2).flatten(1).sum(-1).mean()
        invertibility = (there - it).pow(2).flatten(1).sum(-1).mean()
        loss = consistency + self.invertibility_weight * invertibility
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(f"flow-map matching loss is {float(loss)}")
        return LossTerms(loss, {"consistency": float(consistency.detach()),
                                "invertibility": float(invertibility.detach()), "total": float(loss.detach())},
                         first_term=consistency)


def compose(flow_map: FlowMap, x0: torch.Tensor, t_grid: torch.Tensor) -> torch.Tensor:
    """``X_{t_{n-1}, t_n} o ... o X_{t_0, t_1}(x0)`` over a shared ``(n + 1,)`` grid: ``n`` evaluations."""
    x = x0
    for a, b in zip(t_grid[:-1], t_grid[1:], strict=True):
        x = flow_map(x, as_batch_time(a, x), as_batch_time(b, x))
    return x


def compose_with_logdet(flow_map: FlowMap, x0: torch.Tensor, t_grid: torch.Tensor) -> FlowWithLogDet:
    """The composed map and its exact ``log|det|`` (``(B, D)``, low dimension): per step the full
    Jacobian ``grad_x X_{t_i, t_{i+1}}`` by reverse mode, vectorised over the batch. Samples where a
    step's determinant is ``<= 0`` fold space and are counted (their ``log q`` keeps one preimage)."""
    x = x0.detach()
    logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    folded = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for i, (a, b) in enumerate(zip(t_grid[:-1], t_grid[1:], strict=True)):
        def one(xi: torch.Tensor, a=a, b=b) -> torch.Tensor:
            return flow_map(xi[None], a.reshape(1), b.reshape(1))[0]

        with torch.no_grad():
            jac = vmap(jacrev(one))(x)
            sign, logabs = torch.linalg.slogdet(jac)
            x = flow_map(x, as_batch_time(a, x), as_batch_time(b, x))
        require_finite(x, f"flow map, step {i + 1} of {len(t_grid) - 1}")
        logdet = logdet + logabs
        folded |= sign <= 0
    return FlowWithLogDet(x, logdet, int(folded.sum()))
