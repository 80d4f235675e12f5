"""Local Flow Matching (Xu, Cheng, Xie, arXiv 2410.02548), in this suite's conventions.

The data law ``p_0`` is diffused by Ornstein-Uhlenbeck steps ``h_1, ..., h_{N-1}``:
``x_n = a_n x_{n-1} + c_n z``, ``a_n = exp(-h_n)``, ``c_n = sqrt(1 - a_n^2)``, ``z ~ N(0, I)``; the last
block ``N`` goes to ``N(0, I)`` itself (``a_N = 0``, ``c_N = 1``), so the chain ends exactly in the
prior. Block ``n`` is a flow-matching model between the coupled pair ``(x_n, x_{n-1})``: local time
``tau`` runs from the noisier end (``tau = 0``, ``x_n``) to the cleaner one (``tau = 1``, ``x_{n-1}``),
``x_tau = (1 - tau) x_n + tau x_{n-1}``, target velocity ``x_{n-1} - x_n``. Generation runs the blocks
from ``N`` down to ``1``; the log-likelihood is the prior's plus the sum of the blocks' log-determinants.

On the suite's global time (``t = 0`` noise, ``t = 1`` data) the blocks are ``N`` equal windows:
window ``w = 0, ..., N - 1`` (``TimeWindows``, left-closed) is block ``n = N - w``, with
``t = (w + tau) / N`` and global velocity ``N v_n(x, tau)``; a sampler with ``m`` Euler steps per
window is ``m`` steps of every block (``m N`` NFE).

Reconstruction choices (docs/method.md): the paper trains block ``n`` after block ``n - 1`` on samples
pushed through the trained blocks; here every block trains at once on the exact OU chain of the data
(simulation-free; the same targets when the blocks are exact). The few-step variant distils each
block's ODE into ``m`` Euler steps of a student block by regression on the teacher's block end points
(``LocalFlowDistillationObjective``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InvalidParameter, NonFiniteLossError
from .logdensity import flow_with_logdet
from .models import TimeMLP, TimeMLPConfig, VelocityField, as_batch_time, expand_time
from .objectives import LossTerms
from .solvers import odeint_fixed, uniform_grid
from .windows import TimeWindows


@dataclass(frozen=True)
class LocalFlowChain:
    """The OU chain of ``N = len(step_sizes) + 1`` blocks; ``step_sizes``: ``h_1, ..., h_{N-1} > 0``."""

    step_sizes: tuple[float, ...]

    def __post_init__(self) -> None:
        steps = tuple(float(h) for h in self.step_sizes)
        if not all(math.isfinite(h) and h > 0 for h in steps):
            raise InvalidParameter("step_sizes", list(self.step_sizes), "each OU step must be a finite number > 0")
        object.__setattr__(self, "step_sizes", steps)

    @property
    def n_blocks(self) -> int:
        return len(self.step_sizes) + 1

    @property
    def windows(self) -> TimeWindows:
        return TimeWindows(self.n_blocks)

    def decay(self, n: int) -> float:
        """``a_n = exp(-h_n)`` of block ``n`` (``1 <= n <= N``; ``a_N = 0``)."""
        self._check(n)
        return 0.0 if n == self.n_blocks else math.exp(-self.step_sizes[n - 1])

    def total_time(self, n: int) -> float:
        """``H_n = h_1 + ... + h_n`` (``inf`` for ``n = N``; ``H_0 = 0``)."""
        if n == self.n_blocks:
            return math.inf
        return float(sum(self.step_sizes[:n]))

    def marginal_coefficients(self, n: int) -> tuple[float, float]:
        """``(e^{-H_n}, sqrt(1 - e^{-2 H_n}))``: ``x_n = e^{-H_n} x_0 + sqrt(1 - e^{-2 H_n}) z``."""
        if not 0 <= n <= self.n_blocks:
            raise InvalidParameter("block", n, f"must lie in 0..{self.n_blocks}")
        scale = math.exp(-self.total_time(n))
        return scale, math.sqrt(1.0 - scale * scale)

    def _check(self, n: int) -> None:
        if not 1 <= n <= self.n_blocks:
            raise InvalidParameter("block", n, f"must lie in 1..{self.n_blocks}")

    def block_of_window(self, w: int) -> int:
        return self.n_blocks - w

    def pair(self, x0: torch.Tensor, blocks: torch.Tensor, generator: torch.Generator | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_{n-1}, x_n)`` for data ``x0: (B, ...)`` and per-sample block numbers ``blocks: (B,)``:
        ``x_{n-1}`` from the exact chain marginal, ``x_n`` one OU step of it (coupled)."""
        scales = torch.tensor([self.marginal_coefficients(n)[0] for n in range(self.n_blocks)], dtype=x0.dtype)
        decays = torch.tensor([self.decay(n) for n in range(1, self.n_blocks + 1)], dtype=x0.dtype)
        scale = scales.to(x0.device)[blocks - 1]
        a = decays.to(x0.device)[blocks - 1]
        z = torch.randn((2, *x0.shape), generator=generator, dtype=x0.dtype).to(x0.device)
        clean = expand_time(scale, x0) * x0 + expand_time((1 - scale**2).sqrt(), x0) * z[0]
        noisy = expand_time(a, x0) * clean + expand_time((1 - a**2).sqrt(), x0) * z[1]
        return clean, noisy


class BlockwiseField(nn.Module):
    """``N`` block velocity networks ``v_n(x, tau)`` read as one field on global time.

    ``forward(x, t)`` is ``N v_n(x, tau)`` for ``t`` in window ``w`` (left-closed: a block's own
    start belongs to it, so Euler steps on window-aligned grids use the right block); ``block(w)``
    is the window's local field ``v(x, tau)`` for solvers that evaluate at a window's end (RK4).
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(blocks) < 1:
            raise InvalidParameter("blocks", len(blocks), "need at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.windows = TimeWindows(len(blocks))

    @classmethod
    def mlp(cls, n_blocks: int, dim: int, config: TimeMLPConfig) -> BlockwiseField:
        return cls([TimeMLP.from_config(dim, config) for _ in range(n_blocks)])

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def block(self, w: int) -> nn.Module:
        """Window ``w``'s local field ``v(x, tau)``, ``tau`` in ``[0, 1]`` (block ``N - w``)."""
        return self.blocks[w]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = as_batch_time(t, x)
        w = self.windows.index(t)
        tau = t * self.n_blocks - w.to(t.dtype)
        out = torch.zeros_like(x)
        for k in torch.unique(w).tolist():
            mask = w == k
            out[mask] = self.n_blocks * self.blocks[k](x[mask], tau[mask])
        return out


@dataclass
class LocalFlowMatchingObjective:
    """Every block's flow-matching loss on one data batch ``x0: (B, D)``: each sample draws a block
    ``n`` uniformly and ``tau ~ U[0, 1)``; ``L = mean_n mean || v_n(x_tau, tau) - (x_{n-1} - x_n) ||^2``
    (each block's mean over its samples, then the mean over blocks present)."""

    chain: LocalFlowChain

    def __call__(self, model: BlockwiseField, batch: torch.Tensor, step: int,
                 generator: torch.Generator | None) -> LossTerms:
        if model.n_blocks != self.chain.n_blocks:
            raise InvalidParameter("blocks", model.n_blocks, f"the chain has {self.chain.n_blocks} blocks")
        x0 = batch
        n_blocks = self.chain.n_blocks
        blocks = torch.randint(1, n_blocks + 1, (x0.shape[0],), generator=generator).to(x0.device)
        tau = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype).to(x0.device)
        clean, noisy = self.chain.pair(x0, blocks, generator)
        x_tau = (1 - expand_time(tau, x0)) * noisy + expand_time(tau, x0) * clean
        losses = {}
        for n in torch.unique(blocks).tolist():
            mask = blocks == n
            w = n_blocks - n
            pred = model.block(w)(x_tau[mask], tau[mask])
            losses[n] = (pred - (clean[mask] - noisy[mask])).pow(2).flatten(1).sum(-1).mean()
        loss = torch.stack(list(losses.values())).mean()
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(f"local flow matching loss is {float(loss)}")
        parts = {f"fm_block{n}": float(v.detach()) for n, v in sorted(losses.items())}
        return LossTerms(loss, {**parts, "total": float(loss.detach())})


def run_block(field: VelocityField, x: torch.Tensor, steps: int, method: str = "euler") -> torch.Tensor:
    """One block's ODE ``dx/dtau = v(x, tau)`` from ``tau = 0`` to ``1`` in ``steps`` fixed steps."""
    return odeint_fixed(field, x, uniform_grid(0.0, 1.0, steps, x), method)


@torch.no_grad()
def block_end_points(model: BlockwiseField, z: torch.Tensor, steps: int, method: str = "rk4") -> list[torch.Tensor]:
    """``[x_N = z, x_{N-1}, ..., x_0]``: every block's end point along the chain from noise ``z``."""
    points = [z]
    for w in range(model.n_blocks):
        points.append(run_block(model.block(w), points[-1], steps, method))
    return points


def generate(model: BlockwiseField, z: torch.Tensor, steps_per_block: int, method: str = "euler") -> torch.Tensor:
    """Noise ``z: (B, D)`` to data through the blocks ``N, ..., 1``, ``steps_per_block`` each."""
    x = z
    for w in range(model.n_blocks):
        x = run_block(model.block(w), x, steps_per_block, method)
    return x


@dataclass
class LocalFlowDistillationObjective:
    """A student ``BlockwiseField`` whose block ``n`` does in ``steps`` Euler steps what the teacher's
    block does in ``teacher_steps`` RK4 steps, on the teacher's own chain from noise: the batch is
    ``z: (B, D) ~ N(0, I)``, the teacher gives ``x_N = z, ..., x_0``, and
    ``L = mean_n mean || Euler_n^{steps}(x_n) - x_{n-1} ||^2``."""

    teacher: BlockwiseField
    steps: int = 1
    teacher_steps: int = 8

    def __post_init__(self) -> None:
        for key in ("steps", "teacher_steps"):
            if int(getattr(self, key)) != getattr(self, key) or getattr(self, key) < 1:
                raise InvalidParameter(key, getattr(self, key), "must be an integer >= 1")

    def __call__(self, model: BlockwiseField, batch: torch.Tensor, step: int,
                 generator: torch.Generator | None) -> LossTerms:
        if model.n_blocks != self.teacher.n_blocks:
            raise InvalidParameter("blocks", model.n_blocks, f"the teacher has {self.teacher.n_blocks} blocks")
        points = block_end_points(self.teacher, batch, self.teacher_steps)
        losses = []
        for w in range(model.n_blocks):
            out = run_block(model.block(w), points[w], self.steps)
            losses.append((out - points[w + 1]).pow(2).flatten(1).sum(-1).mean())
        loss = torch.stack(losses).mean()
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(f"local flow distillation loss is {float(loss)}")
        parts = {f"tm_block{model.n_blocks - w}": float(v.detach()) for w, v in enumerate(losses)}
        return LossTerms(loss, {**parts, "total": float(loss.detach())})


class GaussianBlockVelocity(nn.Module):
    """The exact velocity of block ``n`` for Gaussian data ``N(mean, std^2 I)``: ``E[x_{n-1} - x_n | x_tau]``.

    With ``x_{n-1} ~ N(m, s^2 I)`` (``m = e^{-H_{n-1}} mean``, ``s^2 = e^{-2H_{n-1}} std^2 + 1 - e^{-2H_{n-1}}``),
    ``x_tau = alpha x_{n-1} + beta z`` where ``alpha = (1 - tau) a_n + tau``, ``beta = (1 - tau) c_n``, and
    ``D = x_{n-1} - x_n = (1 - a_n) x_{n-1} - c_n z``; jointly Gaussian, so
    ``E[D | x_tau = x] = (1 - a_n) m + C / V (x - alpha m)`` with ``V = alpha^2 s^2 + beta^2`` and
    ``C = (1 - a_n) alpha s^2 - c_n beta``. Call as ``v(x, tau)``; a module, so it can be a block.
    """

    def __init__(self, chain: LocalFlowChain, block: int, mean: torch.Tensor, std: float) -> None:
        super().__init__()
        chain._check(block)
        self.chain, self.block, self.std = chain, block, float(std)
        self.register_buffer("mean", torch.as_tensor(mean))

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        tau = expand_time(as_batch_time(tau, x), x)
        scale, _ = self.chain.marginal_coefficients(self.block - 1)
        m = scale * self.mean.to(x)
        s2 = scale**2 * self.std**2 + 1 - scale**2
        a = self.chain.decay(self.block)
        c = math.sqrt(1 - a * a)
        alpha, beta = (1 - tau) * a + tau, (1 - tau) * c
        var = alpha**2 * s2 + beta**2
        cov = (1 - a) * alpha * s2 - c * beta
        return (1 - a) * m + cov / var * (x - alpha * m)


def log_likelihood(model: BlockwiseField, x: torch.Tensor, steps: int, method: str = "rk4") -> torch.Tensor:
    """``(B,)`` ``log q(x)`` of the chain's flow: each block integrated backward (``tau`` from 1 to 0,
    blocks ``1, ..., N``) with the exact divergence, ``log q(x) = log N(z; 0, I) + sum_n L_n`` where
    ``L_n = int_1^0 div v_n d tau = log|det|`` of the backward block map (continuous change of variables)."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    y = x
    for w in reversed(range(model.n_blocks)):
        flow = flow_with_logdet(model.block(w), y, uniform_grid(1.0, 0.0, steps, y), method)
        y, total = flow.x, total + flow.logdet
    d = y[0].numel()
    return -0.5 * y.flatten(1).pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi) + total
