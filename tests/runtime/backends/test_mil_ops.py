"""Each MIL kernel against coremltools' own reading of the op: built from constant inputs, a MIL
op is evaluated by coremltools' numpy value inference (what its constant folding uses), which
is the reference here. Ops coremltools cannot fold are checked against torch/numpy below."""

from __future__ import annotations

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from coreml_sd.runtime.backends.mil import _constant
from coreml_sd.runtime.backends.mil_ops import KERNELS

rng = np.random.default_rng(0)
A = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
B = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
POS = (np.abs(A) + 0.1).astype(np.float32)
M = rng.standard_normal((3, 4)).astype(np.float32)
N = rng.standard_normal((4, 6)).astype(np.float32)
IDX = np.array([[2, 0], [1, -1]], dtype=np.int32)

# (op, inputs): inputs are passed both to the MIL builder and (as the executor would) to our kernel.
CASES = [
    *[(op, {"x": A, "y": B}) for op in ("add", "sub", "mul", "maximum", "minimum", "equal", "less", "greater",
                                        "less_equal", "greater_equal", "not_equal")],
    ("real_div", {"x": A, "y": POS}),
    ("pow", {"x": POS, "y": B}),
    ("floor_div", {"x": A * 5, "y": POS}),
    *[(op, {"x": A}) for op in ("sin", "cos", "exp", "square", "abs", "tanh", "sigmoid", "relu", "erf", "floor",
                                 "ceil", "round", "sign", "softplus", "silu", "exp2")],
    *[(op, {"x": POS}) for op in ("sqrt",)],
    ("rsqrt", {"x": POS, "epsilon": 1e-3}),
    ("inverse", {"x": POS, "epsilon": 1e-3}),
    ("log", {"x": POS, "epsilon": 1e-3}),
    ("clip", {"x": A, "alpha": -0.5, "beta": 0.7}),
    ("leaky_relu", {"x": A, "alpha": 0.2}),
    ("elu", {"x": A, "alpha": 0.5}),
    *[("gelu", {"x": A, "mode": m}) for m in ("EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION")],
    ("select", {"cond": A > 0, "a": A, "b": B}),
    ("logical_and", {"x": A > 0, "y": B > 0}),
    ("logical_not", {"x": A > 0}),
    ("cast", {"x": A * 10, "dtype": "int32"}),
    ("cast", {"x": A, "dtype": "fp16"}),
    *[(op, {"x": A, "axes": np.array([1, -1], np.int32), "keep_dims": k}) for op in
      ("reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_sum_square",
       "reduce_l2_norm", "reduce_log_sum_exp") for k in (True, False)],
    ("reduce_sum", {"x": A}),
    ("reduce_argmax", {"x": A, "axis": 2, "keep_dims": True}),
    ("reduce_argmin", {"x": A, "axis": -1}),
    ("reduce_argmax", {"x": A, "axis": 1, "output_dtype": "uint16"}),  # iOS 17 input
    ("reduce_argmin", {"x": A, "axis": 0, "keep_dims": True, "output_dtype": "int32"}),
    ("softmax", {"x": A, "axis": 1}),
    ("matmul", {"x": M, "y": N}),
    ("matmul", {"x": N, "y": M, "transpose_x": True, "transpose_y": True}),
    ("linear", {"x": M, "weight": N.T.copy(), "bias": rng.standard_normal(6).astype(np.float32)}),
    ("reshape", {"x": A, "shape": np.array([6, -1], np.int32)}),
    ("transpose", {"x": A, "perm": np.array([0, 3, 1, 2], np.int32)}),
    ("expand_dims", {"x": A, "axes": np.array([0, -1], np.int32)}),
    ("squeeze", {"x": A[:, :1, :, :1], "axes": np.array([1, 3], np.int32)}),
    ("flatten2d", {"x": A, "axis": 2}),
    ("concat", {"values": (A, B), "axis": 2}),
    ("stack", {"values": (A, B), "axis": 1}),
    ("split", {"x": A, "num_splits": 2, "axis": 0}),
    ("split", {"x": A, "split_sizes": np.array([1, 3], np.int32), "axis": 2}),
    ("slice_by_index", {"x": A, "begin": np.array([0, 1, 0, 4], np.int32), "end": np.array([2, 3, 3, 0], np.int32),
                        "stride": np.array([1, 1, 2, -2], np.int32)}),
    ("slice_by_index", {"x": A, "begin": np.array([1, 0, 1, 0], np.int32), "end": np.array([0, 2, 0, 0], np.int32),
                        "begin_mask": np.array([False, True, False, True]), "end_mask": np.array([True, False, True, True]),
                        "squeeze_mask": np.array([True, False, False, False])}),
    ("slice_by_size", {"x": A, "begin": np.array([0, 1, 2, 0], np.int32), "size": np.array([2, -1, 2, 3], np.int32)}),
    ("tile", {"x": M, "reps": np.array([2, 3], np.int32)}),
    ("pad", {"x": A, "pad": np.array([1, 2, 0, 3], np.int32), "mode": "constant", "constant_val": 0.5}),
    ("pad", {"x": A, "pad": np.array([1, 2, 2, 1], np.int32), "mode": "reflect"}),
    ("pad", {"x": A, "pad": np.array([0, 1, 2, 0], np.int32), "mode": "replicate"}),
    ("gather", {"x": A, "indices": IDX, "axis": 2}),
    ("gather", {"x": A, "indices": np.array([[1, 0, 2], [2, 2, 0]], np.int32), "axis": 2, "batch_dims": 1}),
    ("gather_along_axis", {"x": M, "indices": np.array([[0, 2, 1, 0]], np.int32), "axis": 0}),
    ("gather_nd", {"x": A, "indices": np.array([[0, 1], [1, -1]], np.int32)}),
    ("shape", {"x": A}),
    ("fill", {"shape": np.array([2, 3], np.int32), "value": 1.5}),
    ("range_1d", {"end": 5.0, "start": 0.5, "step": 1.5}),
    ("upsample_nearest_neighbor", {"x": A, "scale_factor_height": 2, "scale_factor_width": 3}),
    ("batch_norm", {"x": A, "mean": M[:, 0].copy(), "variance": POS[0, :, 0, 0].copy(), "gamma": B[0, :, 0, 0].copy(),
                    "beta": A[1, :, 1, 1].copy(), "epsilon": 1e-3}),
    ("instance_norm", {"x": A, "gamma": B[0, :, 0, 0].copy(), "beta": A[1, :, 1, 1].copy(), "epsilon": 1e-3}),
    ("layer_norm", {"x": A, "axes": np.array([2, 3], np.int32), "gamma": B[0, 0].copy(), "beta": A[1, 1].copy(),
                    "epsilon": 1e-3}),
    # The two equation forms MIL's einsum accepts, as the converter emits them for split-einsum.
    ("einsum", {"values": (B[:, :, :1].transpose(0, 3, 2, 1).copy(), A[:, :, :1]), "equation": "bkhc,bchq->bkhq"}),
    ("einsum", {"values": (M[None], rng.standard_normal((4, 3, 2)).astype(np.float32)), "equation": "abc,cbd->abd"}),
]


def _norm(x, axes, eps):
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)


def _channel(v):
    return np.asarray(v).reshape(1, -1, 1, 1)


# Numpy references, from the MIL op documentation, for ops coremltools cannot evaluate.
NUMPY = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gather_nd": lambda x, indices: x[tuple(np.where(indices[..., i] < 0, indices[..., i] + x.shape[i], indices[..., i])
                                           for i in range(indices.shape[-1]))],
    "upsample_nearest_neighbor": lambda x, scale_factor_height, scale_factor_width: x.repeat(scale_factor_height, 2)
    .repeat(scale_factor_width, 3),
    "batch_norm": lambda x, mean, variance, gamma, beta, epsilon: (x - _channel(mean)) / np.sqrt(_channel(variance) + epsilon)
    * _channel(gamma) + _channel(beta),
    "instance_norm": lambda x, gamma, beta, epsilon: _norm(x, (2, 3), epsilon) * _channel(gamma) + _channel(beta),
}


def reference(op: str, inputs: dict) -> list[np.ndarray]:
    """coremltools' value of the op on constant inputs."""
    holder = {}
    # Our programs' opset; inputs that only later opsets define select that opset.
    opset = ct.target.iOS17 if "output_dtype" in inputs else ct.target.iOS16

    @mb.program(input_specs=[], opset_version=opset)
    def prog():
        out = getattr(mb, op)(**inputs)
        holder["out"] = out
        first = out[0] if isinstance(out, (tuple, list)) else out
        return mb.identity(x=first) if types.is_tensor(first.sym_type) else mb.const(val=np.zeros(1, np.float32))

    out = holder["out"]
    outs = out if isinstance(out, (tuple, list)) else (out,)
    values = [o.val for o in outs]
    if any(v is None for v in values):
        assert op in NUMPY, f"no reference for {op}: coremltools cannot evaluate it, add one to NUMPY"
        return [np.asarray(NUMPY[op](**inputs))]
    return [np.asarray(v) for v in values]


@pytest.mark.parametrize(("op", "inputs"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_matches_coremltools(op, inputs):
    want = reference(op, inputs)
    args = {k: tuple(_constant(x) for x in v) if isinstance(v, tuple) else _constant(v) for k, v in inputs.items()}
    got = KERNELS[op](**args)
    got = got if isinstance(got, (tuple, list)) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = g.numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        assert g.shape == w.shape, (g.shape, w.shape)
        if w.dtype == np.float16:  # kernels compute in float32; the executor stores the declared type
            g = g.astype(np.float16)
        if w.dtype == bool or w.dtype.kind in "iu":
            np.testing.assert_array_equal(g.astype(w.dtype), w)
        else:
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_concat_interleave_as_documented():
    """coremltools' value inference ignores `interleave`; its documented example is the reference."""
    in1 = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    in2 = np.array([[7, 8], [9, 10], [11, 12]], np.float32)
    got = KERNELS["concat"](values=(_constant(in1), _constant(in2)), axis=0, interleave=True)
    np.testing.assert_array_equal(got.numpy(), [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]])


def test_conv_padding_modes_match_torch():
    """conv has no value inference in coremltools; asymmetric and 'same' padding against torch."""
    x = torch.from_numpy(A)
    w = torch.from_numpy(rng.standard_normal((6, 3, 3, 2)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(6).astype(np.float32))
    got = KERNELS["conv"](x=x, weight=w, bias=b, strides=np.array([2, 1]), pad_type="custom", pad=np.array([1, 0, 0, 1]))
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 1, 0)), w, b, stride=(2, 1))
    torch.testing.assert_close(got, want)
    same = KERNELS["conv"](x=x, weight=w, pad_type="same", dilations=np.array([1, 2]))
    assert same.shape == (2, 6, 4, 5)
    want = torch.nn.functional.conv2d(x, w, None, dilation=(1, 2), padding="same")
    torch.testing.assert_close(same, want)
    grouped = KERNELS["conv"](x=torch.randn(1, 4, 5, 5), weight=torch.randn(4, 1, 3, 3), groups=4)
    assert grouped.shape == (1, 4, 3, 3)


def test_every_kernel_is_tested_here():
    covered = {op for op, _ in CASES} | {
        "conv", "identity", "mod", "logical_or", "logical_xor", "tan", "scaled_dot_product_attention"
    }
    assert set(KERNELS) <= covered, sorted(set(KERNELS) - covered)


def test_uint16_argmax_runs_in_a_program(program_package):
    """iOS 17's output_dtype="uint16" declares a type torch lacks kernels for; the executor holds
    those indices as int32 and returns them as int32 arrays."""
    from coreml_sd.runtime.backends import load_model

    @mb.program(input_specs=[mb.TensorSpec((3, 5))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.reduce_argmax(x=x, axis=1, output_dtype="uint16", name="index")

    model = load_model(program_package(prog, "Argmax", target=ct.target.iOS17), "mil")
    x = rng.standard_normal((3, 5)).astype(np.float32)
    got = model.predict({"x": x})["index"]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, x.argmax(axis=1))
