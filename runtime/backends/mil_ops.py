"""Kernels for the MIL operations, one function per op type, on torch tensors.

A kernel receives the op's inputs by their MIL names: runtime tensors (float16 ones as stored),
constants (float arrays as float32 tensors, integer/bool arrays as numpy, scalars as python
values), and returns a tensor or a tuple of tensors. It computes in float32 (``_f``); the
executor rounds each result to the type the program declares. Optional inputs take the MIL
specification's defaults. Semantics follow the MIL op reference of coremltools 9.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

KERNELS: dict[str, Callable[..., Any]] = {}


def kernel(*names: str):
    def register(fn):
        for name in names:
            KERNELS[name] = fn
        return fn

    return register


# ------------------------------------------------------------------ helpers


def _t(x) -> torch.Tensor:
    """Any input as a tensor (numpy and python scalars included)."""
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _f(x) -> torch.Tensor:
    """A float input in float32 for computing (float16 storage is upcast; ints kept)."""
    t = _t(x)
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _ints(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(x).reshape(-1).tolist()]


def _bools(x, n: int) -> list[bool]:
    return [False] * n if x is None else [bool(v) for v in np.asarray(x).reshape(-1).tolist()]


def _axes(axes, rank: int) -> list[int] | None:
    return None if axes is None else [a % rank if rank else 0 for a in _ints(axes)]


# ------------------------------------------------------------------ elementwise


def _binary(fn):
    return lambda x, y: fn(_f(x), _f(y))


for _name, _fn in {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "real_div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "floor_div": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    "mod": torch.remainder,
    "equal": torch.eq,
    "not_equal": torch.ne,
    "less": torch.lt,
    "less_equal": torch.le,
    "greater": torch.gt,
    "greater_equal": torch.ge,
}.items():
    KERNELS[_name] = _binary(_fn)

for _name, _fn in {"logical_and": torch.logical_and, "logical_or": torch.logical_or, "logical_xor": torch.logical_xor}.items():
    KERNELS[_name] = lambda x, y, _fn=_fn: _fn(_t(x).bool(), _t(y).bool())

for _name, _fn in {
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": torch.tan,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "sqrt": torch.sqrt,
    "square": torch.square,
    "abs": torch.abs,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "relu": F.relu,
    "erf": torch.erf,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "round": torch.round,
    "sign": torch.sign,
    "softplus": F.softplus,
    "identity": lambda x: x,
}.items():
    KERNELS[_name] = lambda x, _fn=_fn: _fn(_f(x))


@kernel("logical_not")
def _logical_not(x):
    return torch.logical_not(_t(x).bool())


@kernel("rsqrt")
def _rsqrt(x, epsilon=1e-12):
    return torch.rsqrt(_f(x) + float(epsilon))


@kernel("inverse")
def _inverse(x, epsilon=1e-4):
    return 1.0 / (_f(x) + float(epsilon))


@kernel("log")
def _log(x, epsilon=1e-45):
    return torch.log(_f(x) + float(epsilon))


@kernel("clip")
def _clip(x, alpha, beta):
    return torch.clamp(_f(x), float(alpha), float(beta))


@kernel("leaky_relu")
def _leaky_relu(x, alpha=0.01):
    return F.leaky_relu(_f(x), float(alpha))


@kernel("elu")
def _elu(x, alpha=1.0):
    return F.elu(_f(x), float(alpha))


@kernel("gelu")
def _gelu(x, mode="EXACT"):
    x = _f(x)
    if mode == "EXACT":
        return F.gelu(x)
    if mode == "TANH_APPROXIMATION":
        return F.gelu(x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"gelu mode {mode!r}")


@kernel("select")
def _select(cond, a, b):
    return torch.where(_t(cond).bool(), _f(a), _f(b))


# uint16 is held as int32, as the executor stores it (mil._STORAGE): from the iOS 17 opset on,
# coremltools casts gather indices to uint16 (the text encoder's end-of-text position).
_CAST = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float32, "int32": torch.int32, "int64": torch.int64,
         "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "uint16": torch.int32, "bool": torch.bool}


@kernel("cast")
def _cast(x, dtype):
    """A cast to a float type returns float32, like every float kernel: the executor rounds it to
    the type the program declares for the result (float16 stays float16 on device, float32 under
    the float32 override). Casts to an integer type truncate toward zero."""
    x = _t(x)
    target = _CAST[dtype]
    if target.is_floating_point:
        return x.float()
    if x.is_floating_point():
        x = torch.trunc(x.float())
    return x.to(target)


# ------------------------------------------------------------------ reductions and softmax


def _reduce(fn):
    def run(x, axes=None, keep_dims=False):
        x = _f(x)
        dims = _axes(axes, x.dim()) or list(range(x.dim()))
        return fn(x, dims, bool(keep_dims))

    return run


KERNELS["reduce_mean"] = _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k))
KERNELS["reduce_sum"] = _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k))
KERNELS["reduce_max"] = _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k))
KERNELS["reduce_min"] = _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k))
KERNELS["reduce_prod"] = _reduce(lambda x, d, k: _prod(x, d, k))
KERNELS["reduce_sum_square"] = _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k))
KERNELS["reduce_l2_norm"] = _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k).sqrt())
KERNELS["reduce_log_sum_exp"] = _reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k))


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


def _arg(fn):
    # output_dtype (iOS 17: "int32" or "uint16") only changes the declared result type; the
    # executor stores both as int32 (see mil._STORAGE), so the indices are returned as int32.
    def run(x, axis=-1, keep_dims=False, output_dtype="int32"):
        if output_dtype not in ("int32", "uint16"):
            raise ValueError(f"output_dtype {output_dtype!r}")
        return fn(_f(x), dim=int(axis), keepdim=bool(keep_dims)).to(torch.int32)

    return run


KERNELS["reduce_argmax"] = _arg(torch.argmax)
KERNELS["reduce_argmin"] = _arg(torch.argmin)


@kernel("softmax")
def _softmax(x, axis=-1):
    return torch.softmax(_f(x), dim=int(axis))


# ------------------------------------------------------------------ linear algebra


@kernel("einsum")
def _einsum(values, equation):
    return torch.einsum(equation, *(_f(v) for v in values))


@kernel("matmul")
def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = _f(x), _f(y)
    if transpose_x:
        x = x.transpose(-1, -2)
    if transpose_y:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


@kernel("linear")
def _linear(x, weight, bias=None):
    return F.linear(_f(x), _f(weight), None if bias is None else _f(bias))


def _same_pads(size: list[int], kernel: list[int], strides: list[int], dilations: list[int], lower: bool) -> list[int]:
    pads = []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        out = math.ceil(n / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        pads += [big, small] if lower else [small, big]
    return pads


@kernel("conv")
def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    x, weight = _f(x), _f(weight)
    spatial = x.dim() - 2
    pointwise = all(k == 1 for k in weight.shape[2:]) and int(groups) == 1
    if pointwise and (strides is None or all(s == 1 for s in _ints(strides))) and (pad_type != "custom" or not any(_ints(pad))):
        # A 1x1 convolution is a matrix product over channels; as one it runs ~1.7x faster.
        out = torch.matmul(weight.reshape(weight.shape[0], -1), x.reshape(x.shape[0], x.shape[1], -1))
        if bias is not None:
            out += _f(bias)[:, None]
        return out.reshape(x.shape[0], -1, *x.shape[2:])
    strides = _ints(strides) if strides is not None else [1] * spatial
    dilations = _ints(dilations) if dilations is not None else [1] * spatial
    if pad_type == "custom":
        pads = _ints(pad)  # [d0_begin, d0_end, d1_begin, d1_end, ...]
    elif pad_type in ("same", "same_lower"):
        pads = _same_pads(list(x.shape[2:]), list(weight.shape[2:]), strides, dilations, pad_type == "same_lower")
    elif pad_type == "valid":
        pads = [0] * (2 * spatial)
    else:
        raise ValueError(f"conv pad_type {pad_type!r}")
    if any(pads):
        # F.pad takes (last_begin, last_end, previous_begin, previous_end, ...).
        x = F.pad(x, [p for i in reversed(range(spatial)) for p in pads[2 * i : 2 * i + 2]])
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, weight, None if bias is None else _f(bias), strides, 0, dilations, int(groups))


# ------------------------------------------------------------------ normalisation


@kernel("batch_norm")
def _batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    x = _f(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - _f(mean).view(shape)) * torch.rsqrt(_f(variance).view(shape) + float(epsilon))
    if gamma is not None:
        y = y * _f(gamma).view(shape)
    if beta is not None:
        y = y + _f(beta).view(shape)
    return y


@kernel("instance_norm")
def _instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    x = _f(x)
    dims = list(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + float(epsilon))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if gamma is not None:
        y = y * _f(gamma).view(shape)
    if beta is not None:
        y = y + _f(beta).view(shape)
    return y


@kernel("layer_norm")
def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    x = _f(x)
    dims = _axes(axes, x.dim()) or list(range(x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + float(epsilon))
    # gamma/beta have the shape of the normalised axes; place them on those axes.
    shape = [x.shape[d] if d in dims else 1 for d in range(x.dim())]
    if gamma is not None:
        y = y * _f(gamma).reshape(shape)
    if beta is not None:
        y = y + _f(beta).reshape(shape)
    return y


# ------------------------------------------------------------------ shapes and data movement


@kernel("reshape")
def _reshape(x, shape):
    x = _t(x)
    dims = _ints(shape)
    dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]  # 0 copies the input's size
    return x.reshape(dims)


@kernel("transpose")
def _transpose(x, perm):
    return _t(x).permute(_ints(perm))


@kernel("expand_dims")
def _expand_dims(x, axes):
    x = _t(x)
    rank = x.dim() + len(_ints(axes))
    for a in sorted(a % rank for a in _ints(axes)):
        x = x.unsqueeze(a)
    return x


@kernel("squeeze")
def _squeeze(x, axes=None):
    x = _t(x)
    if axes is None:
        return x.squeeze()
    for a in sorted(_axes(axes, x.dim()), reverse=True):
        x = x.squeeze(a)
    return x


@kernel("flatten2d")
def _flatten2d(x, axis=1):
    x = _t(x)
    axis = int(axis) % (x.dim() + 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


@kernel("concat")
def _concat(values, axis, interleave=False):
    tensors = [_t(v) for v in values]
    dtype = torch.float32 if len({t.dtype for t in tensors}) > 1 else tensors[0].dtype
    tensors = [t.to(dtype) for t in tensors]
    axis = int(axis) % tensors[0].dim()
    if not interleave:
        return torch.cat(tensors, dim=axis)
    stacked = torch.stack(tensors, dim=axis + 1)  # (.., n_i, k, ..) -> interleave along axis
    return stacked.reshape(*tensors[0].shape[:axis], -1, *tensors[0].shape[axis + 1 :])


@kernel("stack")
def _stack(values, axis):
    return torch.stack([_t(v) for v in values], dim=int(axis))


@kernel("split")
def _split(x, num_splits=None, split_sizes=None, axis=0):
    x = _t(x)
    axis = int(axis) % x.dim()
    if split_sizes is not None:
        return torch.split(x, _ints(split_sizes), dim=axis)
    return torch.chunk(x, int(num_splits), dim=axis)


@kernel("slice_by_index")
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = _t(x)
    rank = x.dim()
    begin, end = _ints(begin), _ints(end)
    stride = _ints(stride) if stride is not None else [1] * rank
    begin_mask, end_mask, squeeze_mask = _bools(begin_mask, rank), _bools(end_mask, rank), _bools(squeeze_mask, rank)
    index = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(begin[i])
            continue
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        if stride[i] > 0:
            index.append(slice(b, e, stride[i]))
        else:  # python slicing handles negative strides; torch does not: flip, then slice
            index.append((b, e, stride[i]))
    out = x
    for axis, idx in reversed(list(enumerate(index))):
        if isinstance(idx, tuple):
            b, e, s = idx
            n = out.shape[axis]
            positions = list(range(n))[slice(b, e, s)]
            out = out.index_select(axis, torch.tensor(positions, dtype=torch.long))
        elif isinstance(idx, slice):
            out = out[(slice(None),) * axis + (idx,)]
        else:
            out = out.select(axis, idx % out.shape[axis])
    return out


@kernel("slice_by_size")
def _slice_by_size(x, begin, size):
    x = _t(x)
    index = []
    for b, s, n in zip(_ints(begin), _ints(size), x.shape):
        b = b % n if n else 0
        index.append(slice(b, n if s == -1 else b + s))
    return x[tuple(index)]


@kernel("tile")
def _tile(x, reps):
    return _t(x).repeat(_ints(reps))


@kernel("pad")
def _pad(x, pad, mode="constant", constant_val=0.0):
    x = _t(x)
    pads = _ints(pad)  # [begin, end] pairs for the last len(pad)/2 dims, outermost first
    n = len(pads) // 2
    torch_pad = [p for i in reversed(range(n)) for p in pads[2 * i : 2 * i + 2]]
    if mode == "constant":
        return F.pad(_f(x), torch_pad, value=float(constant_val))
    return F.pad(_f(x), torch_pad, mode={"reflect": "reflect", "replicate": "replicate"}[mode])


@kernel("upsample_nearest_neighbor")
def _upsample_nearest(x, scale_factor_height=1, scale_factor_width=1):
    x = _t(x)
    sh, sw = float(scale_factor_height), float(scale_factor_width)
    if sh.is_integer() and sw.is_integer():  # exact repetition, no float index arithmetic
        return x.repeat_interleave(int(sh), dim=-2).repeat_interleave(int(sw), dim=-1)
    return F.interpolate(_f(x), scale_factor=(sh, sw), mode="nearest")


@kernel("shape")
def _shape(x):
    return torch.tensor(list(_t(x).shape), dtype=torch.int32)


@kernel("fill")
def _fill(shape, value=0.0):
    return torch.full(_ints(shape), float(value))


@kernel("range_1d")
def _range_1d(end, start, step):
    return torch.arange(float(start), float(end), float(step))


# ------------------------------------------------------------------ gathers


def _index(indices, size: int) -> torch.Tensor:
    idx = _t(indices).long()
    return torch.where(idx < 0, idx + size, idx)


@kernel("gather")
def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    x = _t(x)
    axis = int(axis) % x.dim()
    idx = _index(indices, x.shape[axis])
    b = int(batch_dims)
    if b == 0:
        out = x.index_select(axis, idx.reshape(-1))
        return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])
    # Batched: the leading b dims of x and indices pair up.
    parts = [_gather(x[i], idx[i], axis - 1, b - 1) for i in range(x.shape[0])]
    return torch.stack(parts)


@kernel("gather_along_axis")
def _gather_along_axis(x, indices, axis=0, validate_indices=False):
    x = _t(x)
    axis = int(axis) % x.dim()
    return torch.gather(x, axis, _index(indices, x.shape[axis]))


@kernel("gather_nd")
def _gather_nd(x, indices, batch_dims=0, validate_indices=False):
    x = _t(x)
    idx = _t(indices).long()
    b = int(batch_dims)
    if b:
        return torch.stack([_gather_nd(x[i], idx[i], b - 1) for i in range(x.shape[0])])
    k = idx.shape[-1]
    coords = tuple(torch.where(idx[..., i] < 0, idx[..., i] + x.shape[i], idx[..., i]) for i in range(k))
    return x[coords]


# ------------------------------------------------------------------ attention (iOS 18 programs)


@kernel("scaled_dot_product_attention")
def _sdpa(query, key, value, attn_mask=None):
    mask = None
    if attn_mask is not None:
        m = _t(attn_mask)
        mask = m.bool() if m.dtype == torch.bool else _f(m)
    return F.scaled_dot_product_attention(_f(query), _f(key), _f(value), attn_mask=mask)
