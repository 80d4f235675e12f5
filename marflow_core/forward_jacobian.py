"""Forward-mode Jacobian columns ``J[:, :, j] = (dv/dx) e_j`` of any velocity field, two engines.

* ``tangent_columns`` (the fast one): one forward pass of the field under a
  ``TorchFunctionMode`` that carries, beside every tensor computed from ``x``, its tangents for
  ``K`` basis directions at once, a tensor ``T`` of shape ``(K, *shape)`` (or broadcastable to it:
  ``e_j`` is the same for every row, so ``T_x = I[rows].reshape(K, 1, *x.shape[1:])`` and the first
  layers keep a size-1 batch dimension). Each supported op maps tangents by its exact derivative,
  with the primal-only factors computed once (``silu'(z)`` is one ``(B, width)`` tensor, not one per
  column), so a linear layer costs one GEMM over the ``K * B`` tangent rows and an activation one
  multiply: the cost of ``TimeMLP.jacobian`` for any network built from the supported ops
  (``SUPPORTED``: linear and convolution layers, elementwise activations, arithmetic, matmul,
  views, indexing, concatenation, reductions, softmax, group/layer norm, interpolation, padding).
  An op outside that set whose input carries a tangent raises ``UnsupportedOp``; the caller falls
  back to the next engine. The primal runs through the field's own ops, so ``v`` is bit-identical
  to ``field(x, t)``; the tangent ops are ordinary autograd ops, so with grad enabled the columns
  are differentiable in the parameters and in ``x`` (reverse over forward).
* ``functorch_columns``: ``torch.func.jvp`` under ``torch.func.vmap`` over the basis tangents,
  for any op that has a forward-mode formula (slower on CPU than the tangent engine, since
  ``torch.func`` recomputes primal factors per column and materialises zero tangents).

Both need ``v``'s rows to depend on their own input rows only (``J`` is per row); ``divergence.py``
checks that once per field before it uses them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class UnsupportedOp(RuntimeError):
    """An op with a tangent-carrying input that the tangent engine has no rule for."""


# --- tangent helpers: T has shape (K, *s) with s broadcastable to the primal's shape -----------------


def _lift(tan: torch.Tensor, ndim: int) -> torch.Tensor:
    """Insert size-1 dims after ``K`` so that ``tan`` has ``ndim + 1`` dims (numpy broadcasting)."""
    missing = ndim - (tan.ndim - 1)
    return tan.reshape(tan.shape[0], *([1] * missing), *tan.shape[1:]) if missing > 0 else tan


def _full(tan: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _lift(tan, like.ndim).expand(tan.shape[0], *like.shape)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class _LazyLinear:
    """The tangent ``T_in @ W^T`` of a linear layer, computed only when used: when it is the
    field's output and only the trace is wanted, ``diagonal`` needs ``K`` dot products per row
    instead of the ``(K B, width) x (width, D)`` GEMM."""

    def __init__(self, tan_in: torch.Tensor, weight: torch.Tensor) -> None:
        self.tan_in, self.weight = tan_in, weight

    def value(self) -> torch.Tensor:
        return self.tan_in @ self.weight.T

    def diagonal(self, rows: slice) -> torch.Tensor:
        """``(K, B)``: output ``rows.start + j`` of tangent ``j`` (the batch dim kept as stored)."""
        w = self.weight[rows]  # (K, width)
        return (self.tan_in * w.reshape(w.shape[0], *([1] * (self.tan_in.ndim - 2)), w.shape[1])).sum(-1)


# --- the mode ----------------------------------------------------------------------------------------------


class _Tangents(TorchFunctionMode):
    """Carries tangents of tensors (held weakly: a tangent is freed with its primal)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self._table: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def set(self, primal: torch.Tensor, tan: torch.Tensor | None) -> None:
        if tan is None:
            return
        key, table = id(primal), self._table
        table[key] = (weakref.ref(primal, lambda _, key=key: table.pop(key, None)), tan)

    def raw(self, a) -> torch.Tensor | _LazyLinear | None:
        """The stored tangent of ``a``, possibly a not yet computed ``_LazyLinear``."""
        if not isinstance(a, torch.Tensor):
            return None
        entry = self._table.get(id(a))
        return entry[1] if entry is not None and entry[0]() is a else None

    def get(self, a) -> torch.Tensor | None:
        tan = self.raw(a)
        if isinstance(tan, _LazyLinear):
            tan = tan.value()
            self.set(a, tan)
        return tan

    def carries(self, a) -> bool:
        if isinstance(a, (list, tuple)):
            return any(self.carries(b) for b in a)
        return self.raw(a) is not None

    def close(self) -> None:
        self._table.clear()  # breaks the table <-> weakref-callback cycle at once

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (any(self.carries(a) for a in args) or any(self.carries(a) for a in kwargs.values())):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name == "__get__":  # a property: x.shape, x.T, ...
            name = "." + str(getattr(getattr(func, "__self__", None), "__name__", "?"))
        if name in _NO_TANGENT:
            return func(*args, **kwargs)
        if name in _INPLACE or (name.endswith("_") and not name.startswith("__")) or "out" in kwargs:
            raise UnsupportedOp(f"in-place op {name!r} on or from a tangent-carrying tensor")
        out = func(*args, **kwargs)
        rule = _RULES.get(name)
        if rule is None:
            inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
            if any(o.is_floating_point() and id(o) not in inputs for o in _tensors(out)):
                raise UnsupportedOp(f"no tangent rule for {name!r}")
            return out  # integer / boolean results, or an input returned unchanged
        try:
            rule(self, out, *args, **kwargs)
        except UnsupportedOp:
            raise
        except Exception as err:  # an unforeseen call signature: let the caller fall back
            raise UnsupportedOp(f"tangent rule for {name!r} failed: {err}") from err
        return out


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    return []


_NO_TANGENT = {  # results that carry no derivative of x (constants, detached, non-float)
    "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty",
    "new_full", "new_tensor", "detach", ".data", "sign", "requires_grad_", "retain_grad",
    "rand_like", "randn_like",
}
_INPLACE = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ipow__",
            "__imatmul__", "set_", "copy_"}
_RULES: dict[str, Callable] = {}


def _rule(*names: str):
    def register(fn):
        for n in names:
            _RULES[n] = fn
        return fn
    return register


# --- elementwise -------------------------------------------------------------------------------------------


def _unary(tm: _Tangents, out: torch.Tensor, x: torch.Tensor, slope: torch.Tensor) -> None:
    tm.set(out, _lift(tm.get(x), out.ndim) * slope)


def _refuse_inplace(kwargs: dict, name: str) -> None:
    if kwargs.get("inplace"):
        raise UnsupportedOp(f"{name}(inplace=True)")


@_rule("silu")
def _silu(tm, out, x, inplace=False):
    _refuse_inplace({"inplace": inplace}, "silu")
    s = torch.sigmoid(x)
    _unary(tm, out, x, s * (1 + x * (1 - s)))


@_rule("sigmoid")
def _sigmoid(tm, out, x):
    _unary(tm, out, x, out * (1 - out))


@_rule("tanh")
def _tanh(tm, out, x):
    _unary(tm, out, x, 1 - out * out)


@_rule("relu")
def _relu(tm, out, x, inplace=False):
    _refuse_inplace({"inplace": inplace}, "relu")
    _unary(tm, out, x, (x > 0).to(x.dtype))


@_rule("leaky_relu")
def _leaky_relu(tm, out, x, negative_slope=0.01, inplace=False):
    _refuse_inplace({"inplace": inplace}, "leaky_relu")
    _unary(tm, out, x, (x > 0).to(x.dtype) * (1 - negative_slope) + negative_slope)


@_rule("elu")
def _elu(tm, out, x, alpha=1.0, inplace=False):
    _refuse_inplace({"inplace": inplace}, "elu")
    _unary(tm, out, x, torch.where(x > 0, torch.ones_like(x), out + alpha))


@_rule("gelu")
def _gelu(tm, out, x, approximate="none"):
    if approximate == "tanh":
        c = math.sqrt(2 / math.pi)
        u = c * (x + 0.044715 * x**3)
        th = torch.tanh(u)
        slope = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 3 * 0.044715 * x * x)
    else:
        slope = 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    _unary(tm, out, x, slope)


@_rule("softplus")
def _softplus(tm, out, x, beta=1.0, threshold=20.0):
    _unary(tm, out, x, torch.where(x * beta > threshold, torch.ones_like(x), torch.sigmoid(beta * x)))


@_rule("exp")
def _exp(tm, out, x):
    _unary(tm, out, x, out)


@_rule("log")
def _log(tm, out, x):
    _unary(tm, out, x, 1 / x)


@_rule("sin")
def _sin(tm, out, x):
    _unary(tm, out, x, torch.cos(x))


@_rule("cos")
def _cos(tm, out, x):
    _unary(tm, out, x, -torch.sin(x))


@_rule("sqrt")
def _sqrt(tm, out, x):
    _unary(tm, out, x, 0.5 / out)


@_rule("rsqrt")
def _rsqrt(tm, out, x):
    _unary(tm, out, x, -0.5 * out / x)


@_rule("reciprocal")
def _reciprocal(tm, out, x):
    _unary(tm, out, x, -out * out)


@_rule("square")
def _square(tm, out, x):
    _unary(tm, out, x, 2 * x)


@_rule("neg", "__neg__", "negative")
def _neg(tm, out, x):
    tm.set(out, -tm.get(x))


@_rule("pow", "__pow__")
def _pow(tm, out, x, exponent):
    if tm.carries(exponent) or not isinstance(x, torch.Tensor) or tm.get(x) is None:
        raise UnsupportedOp("pow with a tangent in the exponent")
    _unary(tm, out, x, exponent * x ** (exponent - 1))


def _binary_parts(tm, out, a, b):
    ta = tm.get(a)
    tb = tm.get(b)
    return (None if ta is None else _lift(ta, out.ndim)), (None if tb is None else _lift(tb, out.ndim))


def _sum_tangents(*parts):
    parts = [p for p in parts if p is not None]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


@_rule("mul", "__mul__", "__rmul__", "multiply")
def _mul(tm, out, a, b):
    ta, tb = _binary_parts(tm, out, a, b)
    tm.set(out, _sum_tangents(None if ta is None else ta * b, None if tb is None else a * tb))


@_rule("div", "__truediv__", "true_divide", "divide")
def _div(tm, out, a, b, rounding_mode=None):
    if rounding_mode is not None:
        raise UnsupportedOp("div with rounding")
    ta, tb = _binary_parts(tm, out, a, b)
    tm.set(out, _sum_tangents(None if ta is None else ta / b, None if tb is None else -out * tb / b))


@_rule("__rtruediv__", "__rdiv__")
def _rdiv(tm, out, a, b):  # b / a
    if tm.carries(b):
        raise UnsupportedOp("reflected division by a tangent-carrying tensor")
    ta = _lift(tm.get(a), out.ndim)
    tm.set(out, -out * ta / a)


# add / sub need the op's own sign: registered per name
def _make_add(sign_a: float, sign_b: float):
    def rule(tm, out, a, b, alpha=1, **_):
        ta, tb = _binary_parts(tm, out, a, b)
        tm.set(out, _sum_tangents(None if ta is None else sign_a * ta if sign_a != 1 else ta,
                                    None if tb is None else (sign_b * alpha) * tb))
    return rule


for _n in ("add", "__add__", "__radd__"):
    _RULES[_n] = _make_add(1.0, 1.0)
for _n in ("sub", "__sub__", "subtract"):
    _RULES[_n] = _make_add(1.0, -1.0)
for _n in ("__rsub__", "rsub"):  # rsub(a, b) = b - alpha * a
    def _rsub(tm, out, a, b, alpha=1, **_):
        ta, tb = _binary_parts(tm, out, a, b)
        tm.set(out, _sum_tangents(None if ta is None else -alpha * ta, tb))
    _RULES[_n] = _rsub


# --- linear algebra ----------------------------------------------------------------------------------------


@_rule("linear")
def _linear(tm, out, x, weight, bias=None):
    if tm.carries(weight) or tm.carries(bias):
        raise UnsupportedOp("linear with a tangent-carrying weight or bias")
    tm.set(out, _LazyLinear(_lift(tm.get(x), x.ndim), weight))


def _product(tm, out, a, b, op=torch.matmul):
    if a.ndim < 2 or b.ndim < 2:
        raise UnsupportedOp("matmul of a vector")
    ta, tb = tm.get(a), tm.get(b)
    parts = []
    if ta is not None:
        parts.append(_lift(op(_lift(ta, a.ndim), b), out.ndim))
    if tb is not None:
        parts.append(_lift(op(a, _lift(tb, max(a.ndim, b.ndim))), out.ndim))
    return _sum_tangents(*parts)


@_rule("matmul", "__matmul__", "mm", "bmm")
def _matmul(tm, out, a, b):
    tm.set(out, _product(tm, out, a, b))


@_rule("baddbmm", "addmm")
def _baddbmm(tm, out, base, a, b, beta=1, alpha=1):
    parts = []
    tin = tm.get(base)
    if tin is not None and beta != 0:
        parts.append(beta * _lift(tin, out.ndim))
    if tm.carries(a) or tm.carries(b):
        parts.append(alpha * _product(tm, out, a, b))
    tm.set(out, _sum_tangents(*parts) if parts else torch.zeros_like(out)[None])


# --- convolution, pooling, interpolation: linear in x ------------------------------------------------------


def _linear_in_x(tm, out, x, call):
    """``out = f(x)`` with ``f`` linear: ``T_out = f(T_x)`` with ``K`` folded into the batch."""
    tan = _full(tm.get(x), x).reshape(-1, *x.shape[1:])
    tm.set(out, call(tan).reshape(-1, *out.shape))


@_rule("conv1d", "conv2d", "conv3d")
def _conv(tm, out, x, weight, bias=None, *args, **kwargs):
    if tm.carries(weight) or tm.carries(bias):
        raise UnsupportedOp("convolution with a tangent-carrying weight or bias")
    if x.device.type == "cpu" and not torch.is_grad_enabled():
        # on CPU, without create_graph, the batched VJP (convolution backward kernels) beats these
        # tangent convolutions (UNet 0.8x, float64 convolutions 0.3x; benchmarks/README.md); with
        # create_graph forward mode wins (the image tier's UNet 2.4x)
        raise UnsupportedOp("CPU convolution without create_graph: reverse mode is faster")
    op = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.ndim]
    _linear_in_x(tm, out, x, lambda z: op(z, weight, None, *args, **kwargs))


_LINEAR_FNS = {"interpolate": F.interpolate, "avg_pool1d": F.avg_pool1d, "avg_pool2d": F.avg_pool2d,
               "avg_pool3d": F.avg_pool3d, "adaptive_avg_pool1d": F.adaptive_avg_pool1d,
               "adaptive_avg_pool2d": F.adaptive_avg_pool2d, "adaptive_avg_pool3d": F.adaptive_avg_pool3d}


def _make_linear_fn(name: str):
    fn = _LINEAR_FNS[name]

    def rule(tm, out, x, *args, **kwargs):
        _linear_in_x(tm, out, x, lambda z: fn(z, *args, **kwargs))
    return rule


for _n in _LINEAR_FNS:
    _RULES[_n] = _make_linear_fn(_n)


@_rule("pad")
def _pad(tm, out, x, pad, *args, **kwargs):
    padding_mode = args[0] if args else kwargs.get("mode", "constant")
    if padding_mode == "constant":  # the padded constant has no derivative
        tm.set(out, F.pad(_full(tm.get(x), x), tuple(pad), value=0.0))
    else:
        _linear_in_x(tm, out, x, lambda z: F.pad(z, tuple(pad), mode=padding_mode))


@_rule("dropout")
def _dropout(tm, out, x, p=0.5, training=True, inplace=False):
    if (training and p > 0) or inplace:
        raise UnsupportedOp("dropout in training tm")
    tm.set(out, tm.get(x))


# --- normalisation, softmax --------------------------------------------------------------------------------


def _normalized_tangent(xg: torch.Tensor, tg: torch.Tensor, dims: tuple[int, ...], eps: float):
    """Tangent of ``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased var), ``tg`` full, K first."""
    mean = xg.mean(dims, keepdim=True)
    inv = torch.rsqrt(xg.var(dims, unbiased=False, keepdim=True) + eps)
    xhat = (xg - mean) * inv
    tdims = tuple(d + 1 for d in dims)
    tc = tg - tg.mean(tdims, keepdim=True)
    return (tc - xhat * (xhat * tc).mean(tdims, keepdim=True)) * inv


@_rule("group_norm")
def _group_norm(tm, out, x, num_groups, weight=None, bias=None, eps=1e-5):
    if tm.carries(weight) or tm.carries(bias):
        raise UnsupportedOp("group_norm with a tangent-carrying weight or bias")
    b, c = x.shape[:2]
    xg = x.reshape(b, num_groups, -1)
    tg = _full(tm.get(x), x).reshape(-1, b, num_groups, xg.shape[-1])
    tan = _normalized_tangent(xg, tg, (2,), eps).reshape(-1, *x.shape)
    if weight is not None:
        tan = tan * weight.reshape(c, *([1] * (x.ndim - 2)))
    tm.set(out, tan)


@_rule("layer_norm")
def _layer_norm(tm, out, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if tm.carries(weight) or tm.carries(bias):
        raise UnsupportedOp("layer_norm with a tangent-carrying weight or bias")
    dims = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    tan = _normalized_tangent(x, _full(tm.get(x), x), dims, eps)
    tm.set(out, tan if weight is None else tan * weight)


@_rule("softmax")
def _softmax(tm, out, x, dim=None, *args, **kwargs):
    if dim is None:
        raise UnsupportedOp("softmax without dim")
    d = _dim(dim, x.ndim) + 1
    tan = _full(tm.get(x), x).to(out.dtype)
    tm.set(out, out * (tan - (out * tan).sum(d, keepdim=True)))


@_rule("log_softmax")
def _log_softmax(tm, out, x, dim=None, *args, **kwargs):
    if dim is None:
        raise UnsupportedOp("log_softmax without dim")
    d = _dim(dim, x.ndim) + 1
    tan = _full(tm.get(x), x).to(out.dtype)
    tm.set(out, tan - (out.exp() * tan).sum(d, keepdim=True))


# --- reductions --------------------------------------------------------------------------------------------


def _reduce_dims(x, dim):
    if dim is None:
        return tuple(range(x.ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(_dim(d, x.ndim) for d in dims)


@_rule("sum")
def _sum(tm, out, x, dim=None, keepdim=False, *, dtype=None):
    dims = _reduce_dims(x, dim)
    tm.set(out, _full(tm.get(x), x).sum(tuple(d + 1 for d in dims), keepdim=keepdim))


@_rule("mean")
def _mean(tm, out, x, dim=None, keepdim=False, *, dtype=None):
    dims = _reduce_dims(x, dim)
    tm.set(out, _full(tm.get(x), x).mean(tuple(d + 1 for d in dims), keepdim=keepdim))


# --- shape ops ---------------------------------------------------------------------------------------------


@_rule("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
       "ravel")
def _reshape(tm, out, x, *args, **kwargs):
    tan = tm.get(x)
    tm.set(out, _full(tan, x).reshape(tan.shape[0], *out.shape))


@_rule("expand", "expand_as", "broadcast_to")
def _expand(tm, out, x, *args, **kwargs):
    tan = tm.get(x)
    tm.set(out, _lift(tan, out.ndim).expand(tan.shape[0], *out.shape))


@_rule("permute")
def _permute(tm, out, x, *dims):
    dims = tuple(dims[0]) if len(dims) == 1 and not isinstance(dims[0], int) else dims
    tan = _lift(tm.get(x), x.ndim)
    tm.set(out, tan.permute(0, *(_dim(d, x.ndim) + 1 for d in dims)))


@_rule("transpose", "swapaxes", "swapdims")
def _transpose(tm, out, x, d0, d1):
    tan = _lift(tm.get(x), x.ndim)
    tm.set(out, tan.transpose(_dim(d0, x.ndim) + 1, _dim(d1, x.ndim) + 1))


@_rule("t", ".T")
def _t(tm, out, x):
    tan = _lift(tm.get(x), x.ndim)
    tm.set(out, tan.permute(0, *range(x.ndim, 0, -1)))


@_rule(".mT")
def _mt(tm, out, x):
    tm.set(out, _lift(tm.get(x), x.ndim).transpose(-1, -2))


@_rule("contiguous", "clone", "float", "double", "half", "to", "type_as", "cpu", "cuda", "type")
def _cast(tm, out, x, *args, **kwargs):
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return
    tm.set(out, tm.get(x).to(dtype=out.dtype, device=out.device))


@_rule("__getitem__")
def _getitem(tm, out, x, index):
    if tm.carries(index):
        raise UnsupportedOp("indexing with a tangent-carrying index")
    index = index if isinstance(index, tuple) else (index,)
    tan = _full(tm.get(x), x)[(slice(None), *index)]
    if tan.shape[1:] != out.shape:
        raise UnsupportedOp("advanced indexing that moves dimensions")
    tm.set(out, tan)


def _split_like(tm, outs, x, dim):
    tan = _full(tm.get(x), x)
    start = 0
    d = _dim(dim, x.ndim)
    for o in outs:
        tm.set(o, tan.narrow(d + 1, start, o.shape[d]))
        start += o.shape[d]


@_rule("chunk", "split", "tensor_split")
def _chunk(tm, outs, x, *args, dim=0, **kwargs):
    if len(args) >= 2:
        dim = args[1]
    _split_like(tm, outs, x, dim)


@_rule("unbind")
def _unbind(tm, outs, x, dim=0):
    tan = _full(tm.get(x), x)
    d = _dim(dim, x.ndim) + 1
    for i, o in enumerate(outs):
        tm.set(o, tan.select(d, i))


@_rule("narrow")
def _narrow(tm, out, x, dim, start, length):
    tm.set(out, _full(tm.get(x), x).narrow(_dim(dim, x.ndim) + 1, start, length))


@_rule("cat", "concat", "concatenate")
def _cat(tm, out, tensors, dim=0):
    d = _dim(dim, out.ndim)
    lifted = [None if tm.get(t) is None else _lift(tm.get(t), t.ndim) for t in tensors]
    k = next(t.shape[0] for t in lifted if t is not None)
    # keep a size-1 (broadcast) dim where every tangent has one: e_j is the same for every row
    shape = [1 if all(t is None or t.shape[i + 1] == 1 for t in lifted) else out.shape[i]
             for i in range(out.ndim)]
    parts = []
    for t, tan in zip(tensors, lifted, strict=True):
        size = [*shape[:d], t.shape[d], *shape[d + 1:]]
        parts.append(t.new_zeros(()).expand(k, *size) if tan is None else tan.expand(k, *size))
    tm.set(out, torch.cat(parts, d + 1))


@_rule("stack")
def _stack(tm, out, tensors, dim=0):
    d = _dim(dim, out.ndim)
    parts = [torch.zeros_like(t).expand(tm.k, *t.shape) if tm.get(t) is None else _full(tm.get(t), t)
             for t in tensors]
    tm.set(out, torch.stack(parts, d + 1))


@_rule("where")
def _where(tm, out, cond, a, b):
    ta, tb = _binary_parts(tm, out, a, b)
    zero = out.new_zeros(())
    tm.set(out, torch.where(cond, zero if ta is None else ta, zero if tb is None else tb))


SUPPORTED: tuple[str, ...] = tuple(sorted(_RULES))


# --- the two engines ---------------------------------------------------------------------------------------


def _chunks(dim: int, chunk_size: int | None) -> list[tuple[int, int]]:
    step = dim if chunk_size is None else max(1, chunk_size)
    return [(a, min(a + step, dim)) for a in range(0, dim, step)]


def tangent_columns(
    field: Field, x: torch.Tensor, t: torch.Tensor, chunk_size: int | None = None,
    trace_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, J)`` (``J: (B, D, D)``) or ``(v, tr J)`` (``(B,)``) by the tangent engine.

    ``chunk_size`` columns per pass (None: all ``D`` in one pass; memory ``~ chunk * B * width``
    per layer). Raises ``UnsupportedOp`` for an op without a rule. Runs under the caller's grad
    mode (enabled: the result is differentiable).
    """
    batch, dim = x.shape[0], x[0].numel()
    eye = torch.eye(dim, dtype=x.dtype, device=x.device)
    v, blocks = None, []
    for a, b in _chunks(dim, chunk_size):
        mode = _Tangents(b - a)
        xin = x.view_as(x)  # a fresh tensor object for this pass's table (no copy)
        mode.set(xin, eye[a:b].reshape(b - a, 1, *x.shape[1:]))
        try:
            with mode:
                out = field(xin, t)
            tan = mode.raw(out)
            if trace_only and isinstance(tan, _LazyLinear) and out.ndim == 2:
                blocks.append(tan.diagonal(slice(a, b)).expand(b - a, batch).sum(0))
                tan = None
            else:
                tan = mode.get(out)
                cols = (out.new_zeros(()).expand(b - a, batch, dim) if tan is None
                        else _full(tan, out).reshape(b - a, batch, dim))
                if trace_only:  # entry a + j of column j
                    idx = torch.arange(a, b, device=x.device)
                    blocks.append(cols[torch.arange(b - a, device=x.device), :, idx].sum(0))
                else:
                    blocks.append(cols)
        finally:
            mode.close()
        v = out if v is None else v
    if trace_only:
        return v, _sum_tangents(*blocks)
    return v, torch.cat(blocks).permute(1, 2, 0)


def functorch_columns(
    field: Field, x: torch.Tensor, t: torch.Tensor, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, J)`` by ``torch.func.jvp`` under ``torch.func.vmap`` over the ``D`` basis tangents."""
    from torch.func import jvp, vmap

    batch, dim = x.shape[0], x[0].numel()
    basis = torch.eye(dim, dtype=x.dtype, device=x.device)
    basis = basis.reshape(dim, 1, *x.shape[1:]).expand(dim, batch, *x.shape[1:])
    vs, cols = vmap(lambda e: jvp(lambda z: field(z, t), (x,), (e,)), chunk_size=chunk_size)(basis)
    return vs[0], cols.reshape(dim, batch, dim).permute(1, 2, 0)


def rows_independent(field: Field, x: torch.Tensor, t: torch.Tensor, rows: int = 4) -> bool:
    """Whether ``field`` maps rows independently, checked on the first ``rows`` rows: evaluated
    row by row under ``torch.func.vmap`` (fails for BatchNorm in training mode and in-place updates
    of state) and as a batch, the two must agree to ``sqrt(eps)`` (fails for any coupling across
    rows, e.g. ``x - x.mean(0)``, and for random ops, whose draws differ). Leaves the random
    stream and the field's state as they were (a failing vmap stops before any update)."""
    from torch.func import vmap

    n = min(rows, x.shape[0])
    xs, ts = x[:n].detach(), torch.as_tensor(t, dtype=x.dtype, device=x.device)
    ts = ts.expand(x.shape[0])[:n] if ts.ndim == 0 else ts[:n]
    devices = [x.device] if x.device.type == "cuda" else []
    try:  # random draws differ row by row and batched, so the comparison catches randomness;
        # fork_rng leaves the caller's random stream as it was
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            one = vmap(lambda xi, ti: field(xi[None], ti[None])[0], randomness="different")(xs, ts)
            batch = field(xs, ts)
    except Exception:  # noqa: BLE001 - any failure means "not per-row vmappable"
        return False
    if not isinstance(one, torch.Tensor) or one.shape != batch.shape:
        return False
    tol = math.sqrt(torch.finfo(batch.dtype).eps)
    return bool(torch.allclose(one, batch, rtol=tol, atol=tol * float(batch.abs().max().clamp(min=1))))


__all__: Sequence[str] = ("SUPPORTED", "UnsupportedOp", "functorch_columns", "rows_independent",
                          "tangent_columns")
