"""Attention executed in query chunks, with the program's float16 rounding kept exactly.

A converted attention is ``logits = q.k`` -> (``+ mask``) -> ``softmax`` over keys -> ``p.v``; run
op by op it materialises (B, S_k, 1, S_q) tensors twice in float32 and twice in float16 (at 64x64
latents, 4096 x 4096 per head and batch item), which dominates the UNet's time. Queries are
independent, so the same ops run here on chunks of queries, each intermediate rounded to the type
the program declares for it, as the op-by-op path does, about 3x faster for the large attentions
(results agree with op-by-op execution to one float16 ulp: float32 sums run in another order).

Two op sequences are recognised, the ones coremltools emits for our attention implementations:
``einsum("bkhc,bchq->bkhq") ... einsum("bchk,bkhq->bchq")`` (split-einsum, keys on axis 1) and
``matmul(transpose_x) ... matmul(transpose_y)`` on (B, heads, dh, S) views (original). Anything else
runs op by op, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CHUNK = 128  # queries per chunk: measured fastest on 4096-token attentions (64-256 similar)

_EINSUM_LOGITS, _EINSUM_OUT = "bkhc,bchq->bkhq", "bchk,bkhq->bchq"


@dataclass(frozen=True)
class _Form:
    """Where the query axis sits in each tensor of one attention form."""

    softmax_axis: int  # the keys' axis in the program's logits


_FORMS = {"einsum": _Form(softmax_axis=1), "matmul": _Form(softmax_axis=3)}


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What storing ``x`` as ``dtype`` and reading it back for the next op gives."""
    return x.to(dtype).float() if dtype != torch.float32 else x


def make_kernel(form: str, dtypes: dict[str, torch.dtype]):
    """A kernel computing the whole attention, chunked over queries.

    Inside a chunk the logits are laid out (queries, keys), so the softmax runs over a contiguous
    axis: the values rounded to float16 are the program's, but float32 sums may run in another
    order than op by op, so a result can differ from op-by-op execution by one float16 ulp."""

    def run(q, k, v, mask=None):
        if form == "einsum":  # q (B, c, 1, Sq), k = K^T (B, Sk, 1, c), v (B, c, 1, Sk); one head
            b, c, _, n = q.shape
            qt = q.float().reshape(b, c, n).transpose(1, 2)  # (B, Sq, c)
            kk = k.float().reshape(b, -1, c).transpose(1, 2)  # (B, c, Sk)
            vt = v.float().reshape(b, c, -1).transpose(1, 2)  # (B, Sk, c)
            if mask is not None:  # (1 or B, Sk, 1, Sq) -> (1 or B, Sq, Sk)
                mask = mask.float().reshape(mask.shape[0], mask.shape[1], mask.shape[3]).transpose(1, 2)
            out = torch.empty(b, c, 1, n, dtype=dtypes["out"])
            view = out[:, :, 0]  # (B, c, Sq)
        else:  # q, k, v (B, h, c, S); logits (B, h, Sq, Sk)
            b, h, c, n = q.shape
            qt, kk, vt = q.float().transpose(-1, -2), k.float(), v.float().transpose(-1, -2)
            if mask is not None:
                mask = mask.float()
            out = torch.empty(b, h, c, n, dtype=dtypes["out"])
            view = out
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            w = _round(torch.matmul(qt[..., start:stop, :], kk), dtypes["logits"])  # (.., q, Sk)
            if mask is not None:
                m = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]
                w = _round(w + m, dtypes["masked"])
            p = _round(torch.softmax(w, dim=-1), dtypes["probs"])
            view[..., start:stop] = torch.matmul(p, vt).transpose(-1, -2).to(dtypes["out"])
        return out

    return run


def match(steps: list, consumers: dict[str, int], start: int) -> tuple[str, int, dict[str, Any]] | None:
    """If ``steps[start]`` begins an attention, return (form, number of steps, fused args)."""
    first = steps[start]
    if first.op_type == "einsum" and first.args.get("equation") == _EINSUM_LOGITS:
        form, (k, q) = "einsum", first.args["values"]
    elif first.op_type == "matmul" and _flag(first.args.get("transpose_x")) and not _flag(first.args.get("transpose_y")):
        form, q, k = "matmul", first.args["x"], first.args["y"]
    else:
        return None
    spec = _FORMS[form]
    i, name, args = start + 1, first.outputs[0][0], {"q": q, "k": k}
    if consumers.get(name) != 1 or i >= len(steps):
        return None
    if steps[i].op_type == "add" and _is(steps[i].args.get("x"), name):  # additive mask
        args["mask"] = steps[i].args["y"]
        name, i = steps[i].outputs[0][0], i + 1
        if consumers.get(name) != 1 or i >= len(steps):
            return None
    soft = steps[i]
    if soft.op_type != "softmax" or not _is(soft.args.get("x"), name) or int(soft.args.get("axis", -1)) % 4 != spec.softmax_axis:
        return None
    name, i = soft.outputs[0][0], i + 1
    if consumers.get(name) != 1 or i >= len(steps):
        return None
    last = steps[i]
    if (
        form == "einsum"
        and last.op_type == "einsum"
        and last.args.get("equation") == _EINSUM_OUT
        and _is(last.args["values"][1], name)
    ):
        args["v"] = last.args["values"][0]
    elif (
        form == "matmul"
        and last.op_type == "matmul"
        and _is(last.args.get("y"), name)
        and _flag(last.args.get("transpose_y"))
        and not _flag(last.args.get("transpose_x"))
    ):
        args["v"] = last.args["x"]
    else:
        return None
    if not all(type(args[key]).__name__ == "_Var" for key in ("q", "k", "v")):
        return None
    if form == "einsum" and not _single_head(steps[start]):
        return None
    return form, i - start + 1, args


def _single_head(step) -> bool:
    """The einsum form is fused for the (B, C, 1, S) layout only (its 'h' axis of size 1)."""
    return step.output_shapes[0][2] == 1 if step.output_shapes else False


def _flag(value) -> bool:
    return bool(value) if value is not None else False


def _is(value, name: str) -> bool:
    return type(value).__name__ == "_Var" and value.name == name
