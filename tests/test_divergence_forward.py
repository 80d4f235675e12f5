"""Forward-mode exact Jacobians and divergences against closed forms and independent autograd routes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marflow_core import TimeMLP, batch_jacobian, default_jacobian_method, exact_divergence
from marflow_core.divergence import jacobian_plan, reverse_jacobian
from marflow_core.forward_jacobian import (
    UnsupportedOp,
    functorch_columns,
    rows_independent,
    tangent_columns,
)
from marflow_core.logdensity import euler_map_with_logdet

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rowwise_jacobian(field, x, t):
    """Per-row Jacobians by torch.autograd.functional.jacobian, one row at a time (independent)."""
    dim = x[0].numel()
    return torch.stack([
        torch.autograd.functional.jacobian(
            lambda xi, b=b: field(xi.reshape(1, *x.shape[1:]), t[b: b + 1]).reshape(dim),
            x[b].reshape(dim))
        for b in range(x.shape[0])
    ])


class CatMLP(nn.Module):
    """A user's own network: ``nn.Sequential`` over ``cat(x, t)``, two hidden SiLU layers."""

    def __init__(self, dim: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


class ConvField(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
                                 nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None, None, None].expand(-1, 1, *x.shape[2:])], 1))


class BNField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x, t):
        return self.net(x)


def test_linear_field_trace_and_jacobian_closed_form():
    """v = A x + b t: J = A and div = tr(A) for every row, by every method."""
    a = torch.randn(5, 5, generator=_gen(0), dtype=F64)
    b = torch.randn(5, generator=_gen(1), dtype=F64)

    def field(x, t):
        return x @ a.T + t[:, None] * b

    x, t = torch.randn(3, 5, generator=_gen(2), dtype=F64), torch.rand(3, generator=_gen(3), dtype=F64)
    assert jacobian_plan(field, x, t) == "tangent"
    for method in ("auto", "forward", "reverse"):
        v, jac = batch_jacobian(field, x, t, method=method)
        torch.testing.assert_close(jac, a.expand(3, 5, 5), rtol=0, atol=1e-14)
        torch.testing.assert_close(v, field(x, t), rtol=0, atol=0)
        _, div = exact_divergence(field, x, t, method=method)
        torch.testing.assert_close(div, torch.full((3,), float(a.trace()), dtype=F64), rtol=0, atol=1e-13)


def test_tanh_field_jacobian_is_diag_times_w():
    """v = tanh(W x): J = diag(1 - tanh^2(W x)) W, div = sum_i (1 - tanh^2(Wx)_i) W_ii."""
    w = torch.randn(6, 6, generator=_gen(4), dtype=F64)
    x, t = torch.randn(4, 6, generator=_gen(5), dtype=F64), torch.zeros(4, dtype=F64)
    field = lambda z, s: torch.tanh(z @ w.T)  # noqa: E731
    slope = 1 - torch.tanh(x @ w.T) ** 2
    expected = slope[:, :, None] * w
    _, jac = batch_jacobian(field, x, t, method="forward")
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-14)
    _, div = exact_divergence(field, x, t)
    torch.testing.assert_close(div, (slope * w.diagonal()).sum(-1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dim", [2, 4, 7])
def test_users_sequential_mlp_matches_functional_jacobian(dim):
    torch.manual_seed(0)
    model = CatMLP(dim).double()
    x, t = torch.randn(5, dim, generator=_gen(6), dtype=F64), torch.rand(5, generator=_gen(7), dtype=F64)
    assert jacobian_plan(model, x, t) == ("reverse" if dim < 4 else "tangent")  # FORWARD_MIN_DIM
    expected = _rowwise_jacobian(model, x, t)
    v, jac = batch_jacobian(model, x, t)
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(v, model(x, t).detach(), rtol=0, atol=0)
    _, div = exact_divergence(model, x, t)
    torch.testing.assert_close(div, expected.diagonal(dim1=1, dim2=2).sum(-1), rtol=0, atol=1e-10)
    assert not jac.requires_grad and not div.requires_grad


def test_conv_field_on_images_matches_functional_jacobian():
    torch.manual_seed(1)
    model = ConvField().double()
    x = torch.randn(3, 1, 8, 8, generator=_gen(8), dtype=F64)
    t = torch.rand(3, generator=_gen(9), dtype=F64)
    assert jacobian_plan(model, x, t) == "tangent"
    expected = _rowwise_jacobian(model, x, t)
    _, jac = batch_jacobian(model, x, t)
    assert jac.shape == (3, 64, 64)
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-10)
    _, div = exact_divergence(model, x, t, chunk_size=5)
    torch.testing.assert_close(div, expected.diagonal(dim1=1, dim2=2).sum(-1), rtol=0, atol=1e-10)
    # CPU convolutions without create_graph decline the engine (reverse mode is faster);
    # with grad enabled (create_graph) the engine's convolution rule runs
    assert jacobian_plan(model, x, t) == "reverse"
    assert jacobian_plan(model, x, t, create_graph=True) == "tangent"
    with torch.enable_grad():
        _, jac_fwd = tangent_columns(model, x, t, chunk_size=7)
    torch.testing.assert_close(jac_fwd.detach(), expected, rtol=0, atol=1e-10)
    with torch.no_grad(), pytest.raises(UnsupportedOp, match="convolution"):
        tangent_columns(model, x, t)


def test_chunk_sizes_agree():
    torch.manual_seed(2)
    model = CatMLP(9).double()
    x, t = torch.randn(4, 9, generator=_gen(10), dtype=F64), torch.rand(4, generator=_gen(11), dtype=F64)
    _, full = batch_jacobian(model, x, t, method="forward")
    _, full_div = exact_divergence(model, x, t, method="forward")
    for chunk in (1, 2, 4, 9, 50):
        _, jac = batch_jacobian(model, x, t, method="forward", chunk_size=chunk)
        _, div = exact_divergence(model, x, t, method="forward", chunk_size=chunk)
        torch.testing.assert_close(jac, full, rtol=0, atol=1e-14)
        torch.testing.assert_close(div, full_div, rtol=0, atol=1e-14)
    _, fjac = functorch_columns(model, x, t, chunk_size=4)
    torch.testing.assert_close(fjac.detach(), full, rtol=0, atol=1e-14)


def test_batchnorm_in_training_falls_back_to_reverse_mode():
    """Rows coupled through batch statistics: not per-row vmappable, so auto takes reverse mode,
    and the check leaves the running statistics as one forward pass leaves them."""
    torch.manual_seed(3)
    field = BNField().double().train()
    model, twin = field.net, copy.deepcopy(field.net)
    x, t = torch.randn(6, 4, generator=_gen(12), dtype=F64), torch.zeros(6, dtype=F64)
    assert not rows_independent(field, x, t)
    assert jacobian_plan(field, x, t) == "reverse"
    _, jac = batch_jacobian(field, x, t)
    _, ref = reverse_jacobian(lambda z, s: twin(z), x, t)
    torch.testing.assert_close(jac, ref, rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean, rtol=0, atol=0)
    field.eval()  # eval mode (decided afresh): rows independent again, forward mode, same Jacobian as autograd
    assert jacobian_plan(field, x, t) == "tangent"
    torch.testing.assert_close(batch_jacobian(field, x, t)[1], _rowwise_jacobian(field, x, t), rtol=0, atol=1e-12)


def test_coupled_and_random_fields_take_reverse_mode_and_keep_the_random_stream():
    x, t = torch.randn(5, 4, generator=_gen(13), dtype=F64), torch.zeros(5, dtype=F64)
    coupled = lambda z, s: z - z.mean(0)  # noqa: E731
    assert jacobian_plan(coupled, x, t) == "reverse"
    drop = nn.Dropout(0.5).train()
    noisy = lambda z, s: drop(z)  # noqa: E731
    state = torch.get_rng_state()
    assert not rows_independent(noisy, x, t)
    assert torch.equal(state, torch.get_rng_state())
    assert jacobian_plan(noisy, x, t) == "reverse"
    drop.p = 0.0  # no randomness left: per-row again
    assert rows_independent(lambda z, s: drop(z) * 2, x, t)


def test_op_without_rule_falls_back_and_stays_exact():
    """cumsum has no tangent rule: the engine refuses, auto takes the next path, values exact."""
    x, t = torch.randn(3, 4, generator=_gen(14), dtype=F64), torch.zeros(3, dtype=F64)
    field = lambda z, s: torch.cumsum(torch.sin(z), dim=1)  # noqa: E731
    with pytest.raises(UnsupportedOp):
        tangent_columns(field, x, t)
    lower = torch.tril(torch.ones(4, 4, dtype=F64))
    expected = lower[None] * torch.cos(x)[:, None, :]
    for create_graph in (False, True):
        _, jac = batch_jacobian(field, x, t, create_graph)
        torch.testing.assert_close(jac.detach(), expected, rtol=0, atol=1e-14)
    assert jacobian_plan(field, x, t) == "reverse"
    assert jacobian_plan(field, x, t, create_graph=True) == "functorch"


def test_method_choice_and_default_context():
    torch.manual_seed(4)
    mlp = TimeMLP(3, 16, 2, time_dim=4).double()
    x, t = torch.randn(4, 3, generator=_gen(15), dtype=F64), torch.rand(4, generator=_gen(16), dtype=F64)
    assert jacobian_plan(mlp, x, t) == "jacobian_field"
    assert jacobian_plan(mlp, x, t, "reverse") == "reverse"
    with default_jacobian_method("reverse"):
        assert jacobian_plan(mlp, x, t) == "reverse"
        torch.testing.assert_close(batch_jacobian(mlp, x, t)[1], _rowwise_jacobian(mlp, x, t), rtol=0, atol=1e-12)
    assert jacobian_plan(mlp, x, t) == "jacobian_field"
    with pytest.raises(ValueError, match="sideways"):
        batch_jacobian(mlp, x, t, method="sideways")


def _fd_check(model, loss_of_jacobian, x, t, jac_fn):
    """Analytic d loss / d theta along a random direction (create_graph) vs central differences."""
    params = [p for p in model.parameters() if p.requires_grad]
    direction = [torch.randn(p.shape, generator=_gen(17 + i), dtype=F64) for i, p in enumerate(params)]
    grads = torch.autograd.grad(loss_of_jacobian(*jac_fn(model, x, t)), params, allow_unused=True)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True) if g is not None)

    def loss(sign: float, eps: float = 1e-6) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
            value = float(loss_of_jacobian(*batch_jacobian(model, x, t, method="reverse")))
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
        return value

    return analytic, (loss(1.0) - loss(-1.0)) / 2e-6


def _functorch_with_grad(model, x, t):
    with torch.enable_grad():
        return functorch_columns(model, x, t)


@pytest.mark.parametrize("engine", ["tangent", "functorch"])
def test_create_graph_parameter_gradient_matches_finite_differences(engine):
    """d/d theta of sum log|det(I + h J)| + |v|^2 through forward mode (reverse over forward)."""
    torch.manual_seed(5)
    model = CatMLP(4).double()
    x, t = torch.randn(3, 4, generator=_gen(20), dtype=F64), torch.rand(3, generator=_gen(21), dtype=F64)
    eye = torch.eye(4, dtype=F64)

    def loss(v, jac):
        return torch.linalg.slogdet(eye + 0.3 * jac)[1].sum() + v.pow(2).sum()

    assert jacobian_plan(model, x, t, create_graph=True) == "tangent"
    jac_fn = (_functorch_with_grad if engine == "functorch"
              else lambda m, x, t: batch_jacobian(m, x, t, create_graph=True))
    analytic, fd = _fd_check(model, loss, x, t, jac_fn)
    assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-8)
    assert abs(analytic) > 1e-3


def test_create_graph_through_a_two_step_euler_map_equals_reverse_mode():
    """x after the first step depends on theta: gradients of the exact log-det agree, forward vs reverse."""
    torch.manual_seed(6)
    model = ConvField().double()
    x = torch.randn(2, 1, 4, 4, generator=_gen(22), dtype=F64)
    grid = torch.tensor([0.1, 0.4, 0.8], dtype=F64)
    params = list(model.parameters())
    grads = {}
    for method in ("forward", "reverse"):
        flow = euler_map_with_logdet(model, x, grid, create_graph=True, jacobian_method=method)
        grads[method] = torch.autograd.grad(flow.logdet.sum() + flow.x.pow(2).sum(), params)
    for a, b in zip(grads["forward"], grads["reverse"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert max(float(g.abs().max()) for g in grads["forward"]) > 1e-3


def _rule_fields():
    """Small fields, each using a few tangent rules (x: (B, 6) unless stated)."""
    w = torch.randn(6, 6, generator=_gen(30), dtype=F64) / 2
    w3 = torch.randn(2, 3, 3, generator=_gen(31), dtype=F64)
    conv1 = torch.randn(1, 2, 3, generator=_gen(32), dtype=F64)
    gn_w, ln_w = torch.rand(6, generator=_gen(33), dtype=F64) + 0.5, torch.rand(3, generator=_gen(34), dtype=F64)
    return {
        "activations": lambda x, t: F.silu(x) + torch.sigmoid(x) * 2 - F.relu(x) + F.leaky_relu(x, 0.2)
        + F.elu(x, 0.7) + F.softplus(x, beta=2.0),
        "gelu": lambda x, t: F.gelu(x) * F.gelu(x, approximate="tanh"),
        "exp_log_trig": lambda x, t: torch.exp(x / 3) + torch.log(x * x + 1) + torch.sin(x) * torch.cos(x),
        "powers": lambda x, t: torch.sqrt(x * x + 1) + torch.rsqrt(x * x + 2) + torch.reciprocal(x + 5)
        + torch.square(x) + x**3 - (-x),
        "arithmetic": lambda x, t: (1 - x) * 2 + 3 / (x + 4) - x / (x * x + 1) + torch.add(x, x, alpha=0.5)
        - torch.sub(x, 2 * x, alpha=3) + 2 * x - x.mul(x),
        "matmul_family": lambda x, t: (x @ w + torch.mm(x, w) + torch.matmul(x.tanh(), w.T)
                                       + torch.addmm(x, x, w, beta=0.5, alpha=2.0)),
        "batched_matmul": lambda x, t: (torch.bmm(x.view(-1, 2, 3), x.view(-1, 3, 2).sin()).flatten(1).sum(-1, keepdim=True)
                                        * x + torch.baddbmm(x.view(-1, 2, 3), x.view(-1, 2, 3), w3[1].expand(x.shape[0], 3, 3),
                                                            beta=0.3, alpha=0.7).reshape(-1, 6)
                                        + (x.view(-1, 2, 3) @ w3[0]).reshape(-1, 6)),
        "norms_softmax": lambda x, t: F.group_norm(x.view(-1, 6, 1), 2, gn_w, None).flatten(1)
        + F.layer_norm(x.view(-1, 2, 3), (3,), ln_w, None).reshape(-1, 6)
        + torch.softmax(x, dim=-1) + F.log_softmax(x.view(-1, 2, 3), dim=1).flatten(1),
        "reductions": lambda x, t: x * x.sum(-1, keepdim=True) + x.mean(dim=1, keepdim=True) + x.pow(2).sum(-1, keepdim=True)
        + x.view(-1, 2, 3).mean((1, 2))[:, None],
        "shapes": lambda x, t: (x.view(-1, 2, 3).permute(0, 2, 1).reshape(-1, 6)
                                + x.unflatten(1, (3, 2)).transpose(1, 2).flatten(1)
                                + x.view(-1, 2, 3).mT.reshape(-1, 6).contiguous() * 1.0
                                + x.unsqueeze(-1).squeeze(-1).expand(x.shape[0], 6).to(F64)
                                + x.view(-1, 6, 1).expand(-1, 6, 2).sum(-1) + x.clone()),
        "indexing_split": lambda x, t: torch.cat([x[:, 3:], x[:, :3] * 2], 1) + torch.stack(x.chunk(2, 1), 1).flatten(1)
        + torch.cat(list(torch.split(x, [2, 4], dim=1))[::-1], dim=-1) + torch.cat(x.unbind(1), 0).view(6, -1).T
        + x.narrow(1, 0, 6) + x[..., None][:, :, 0] + x[:, [5, 4, 3, 2, 1, 0]],
        "where_cat_const": lambda x, t: torch.where(x > 0, x * x, torch.zeros_like(x))
        + torch.cat([x[:, :2], torch.ones(x.shape[0], 4, dtype=F64)], 1) * x,
        "conv1d_pool_interp_pad": lambda x, t: (
            F.interpolate(F.avg_pool1d(F.conv1d(F.pad(x.view(-1, 2, 3), (1, 1), mode="reflect"), conv1),
                                       1), scale_factor=2, mode="linear").flatten(1)
            + F.pad(x[:, :4], (1, 1), value=3.0) + F.dropout(x, 0.5, training=False)
            + F.adaptive_avg_pool1d(x.view(-1, 1, 6), 6).flatten(1)),
    }


@pytest.mark.parametrize("name", sorted(_rule_fields()))
def test_tangent_rules_match_autograd(name):
    field = _rule_fields()[name]
    x, t = torch.randn(3, 6, generator=_gen(40), dtype=F64), torch.zeros(3, dtype=F64)
    v, jac = tangent_columns(field, x, t)
    torch.testing.assert_close(v, field(x, t), rtol=0, atol=0)
    torch.testing.assert_close(jac, _rowwise_jacobian(field, x, t), rtol=1e-12, atol=1e-12)
    _, div = tangent_columns(field, x, t, chunk_size=4, trace_only=True)
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-12, atol=1e-12)


def test_in_place_and_unknown_ops_are_refused():
    x, t = torch.randn(2, 3, dtype=F64), torch.zeros(2, dtype=F64)
    for field in (lambda z, s: (z * 2).add_(1), lambda z, s: F.silu(z * 1, inplace=True),
                  lambda z, s: torch.cummax(z, 1).values, lambda z, s: torch.erf(z)):
        with pytest.raises(UnsupportedOp):
            tangent_columns(field, x, t)


def test_image_tier_unet_forward_equals_reverse_in_float64():
    """The tier's UNet architecture (small): Jacobian and MA-style parameter gradient agree."""
    from marflow_core.unet import UNetConfig, UNetVelocity

    torch.manual_seed(7)
    unet = UNetVelocity(1, 4, UNetConfig(widths=[8, 16], norm_groups=4, attention_head_dim=8)).double()
    for module in unet.modules():  # diffusers runs attention's softmax in float32: keep float64
        if hasattr(module, "upcast_softmax"):
            module.upcast_softmax = False
    x = torch.randn(2, 1, 4, 4, generator=_gen(50), dtype=F64)
    t = torch.rand(2, generator=_gen(51), dtype=F64)
    assert jacobian_plan(unet, x, t, create_graph=True) == "tangent"
    params = list(unet.parameters())
    eye = torch.eye(16, dtype=F64)
    out = {}
    for method in ("forward", "reverse"):
        v, jac = batch_jacobian(unet, x, t, create_graph=True, method=method)
        loss = torch.linalg.slogdet(eye + 0.25 * jac)[1].sum() + v.pow(2).sum()
        out[method] = (jac.detach(), torch.autograd.grad(loss, params, allow_unused=True))
    torch.testing.assert_close(out["forward"][0], out["reverse"][0], rtol=0, atol=1e-12)
    for a, b in zip(out["forward"][1], out["reverse"][1], strict=True):
        if a is None or b is None:
            assert a is None or float(a.abs().max()) == 0.0
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert jacobian_plan(unet, x, t, create_graph=True) == "tangent"
    assert math.isfinite(float(out["forward"][0].abs().max()))
