"""The public ops as the contract tests (test_op_contracts.py) see them: one entry per op, so
that a new op gets every contract (determinism, NaN locality, empty batch, partial
requires_grad, torch.library opcheck, torch.compile fullgraph, the bad inputs every op refuses
alike) by adding one entry here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from helpers import ATTENTION_TARGETS, BACKEND_TARGETS, TARGETS, make_qk, make_qkv, make_single_frame_qk

import amflow_kernels
from amflow_kernels import reference
from amflow_kernels._layout import as_heads, as_single_frames


@dataclass(frozen=True)
class OpSpec:
    """``function``: the public op; ``blank(tokens, head_dim)``: its tensor inputs by name, float32
    zeros on the CPU, for the bad-input cases; ``make(device, batch, tokens)``: the inputs (leaves
    that require grad) in a layout users pass; ``call(inputs, backend)`` and ``reference(inputs)``
    compute the op; ``poison(inputs)`` plants non-finite values in detached copies;
    ``registered(inputs)``: the family, the registered forward op's tensor inputs and its other
    arguments; ``targets``: the backends (and Triton forward paths) that serve it."""

    name: str
    function: Callable
    blank: Callable
    make: Callable
    call: Callable
    reference: Callable
    poison: Callable
    registered: Callable
    targets: list
    tokens: int  # enough for several blocks and chunks: the determinism case


def _am_flow_inputs(device, batch, tokens):
    q, k, _ = make_qk("qkv", batch, 3, 2, tokens, 32, torch.float32, device)
    return q, k


def _am_flow_poison(q, k):
    q[4, 0, 5] = float("nan")  # clip 1, frame 1, head 0, token 5 of (B·T, H, N, D)
    k[0, 1, 3, 7] = float("inf")


def _attention_colsum_inputs(device, batch, tokens):
    return make_single_frame_qk((batch, 3, tokens, 32), "qkv", torch.float32, device)


def _attention_colsum_poison(q, k):
    q[1, 0, 4] = float("nan")


def _linear_attention_inputs(device, batch, tokens):
    return tuple(make_qkv("projection", (batch, 3), tokens, tokens, 16, 24, torch.float32, device))


def _linear_attention_poison(q, k, v):
    k[1, 2, 7, 3] = float("nan")
    v[0, 1, 5, 0] = float("inf")


def _qkv_blank(tokens, head_dim):
    return {name: torch.zeros(1, 2, tokens, head_dim) for name in ("q", "k", "v")}


def _attention_inputs(device, batch, tokens):
    q, k, v = make_qkv("projection", (batch, 3), tokens, tokens, 16, 24, torch.float32, device)
    bias = torch.randn(batch, 3, tokens, device=device)
    bias[..., 1] = float("-inf")  # a masked key
    return q, k, v, bias.requires_grad_()


def _attention_poison(q, k, v, bias):
    q[1, 0, 4, 2] = float("nan")  # a query row of batch 1, head 0: below colsum_rows, every key's colsum too
    v[0, 2, 6, 1] = float("inf")


def _attention_outputs(out, colsum):
    """The op's two outputs as one tensor for the contracts: (..., Nq·Dv + Nk)."""
    return torch.cat([out.flatten(-2), colsum.to(out.dtype)], dim=-1)


OP_SPECS = [
    OpSpec(
        name="am_flow",
        function=amflow_kernels.am_flow,
        blank=lambda n, d: dict(q=torch.zeros(1, 3, 2, n, d), k=torch.zeros(1, 3, 2, n, d)),
        make=_am_flow_inputs,
        call=lambda inputs, backend: amflow_kernels.am_flow(*inputs, num_frames=3, backend=backend),
        reference=lambda inputs: reference.am_flow(*inputs, num_frames=3),
        poison=_am_flow_poison,
        registered=lambda q, k: ("softmax_colsum", (q.unflatten(0, (-1, 3)), k.unflatten(0, (-1, 3))), (1, True, 0.25)),
        targets=TARGETS,
        tokens=70,
    ),
    OpSpec(
        name="attention_colsum",
        function=amflow_kernels.attention_colsum,
        blank=lambda n, d: dict(q=torch.zeros(2, n, d), k=torch.zeros(2, n, d)),
        make=_attention_colsum_inputs,
        call=lambda inputs, backend: amflow_kernels.attention_colsum(*inputs, backend=backend),
        reference=lambda inputs: reference.attention_colsum(*inputs),
        poison=_attention_colsum_poison,
        registered=lambda q, k: ("softmax_colsum", (as_single_frames(q), as_single_frames(k)), (0, False, 0.3)),
        targets=TARGETS,
        tokens=70,
    ),
    OpSpec(
        name="attention",
        function=amflow_kernels.attention,
        blank=_qkv_blank,
        make=_attention_inputs,
        call=lambda inputs, backend: _attention_outputs(
            *amflow_kernels.attention(*inputs[:3], key_bias=inputs[3], colsum_rows=5, backend=backend)
        ),
        reference=lambda inputs: _attention_outputs(
            *reference.attention(*inputs[:3], key_bias=inputs[3], colsum_rows=5)
        ),
        poison=_attention_poison,
        registered=lambda q, k, v, bias: ("attention", (as_heads(q), as_heads(k), as_heads(v), bias.flatten(0, 1)),
                                          (5, 0.25)),
        targets=ATTENTION_TARGETS,
        tokens=70,
    ),
    OpSpec(
        name="linear_attention",
        function=amflow_kernels.linear_attention,
        blank=_qkv_blank,
        make=_linear_attention_inputs,
        call=lambda inputs, backend: amflow_kernels.linear_attention(*inputs, backend=backend),
        reference=lambda inputs: reference.linear_attention(*inputs),
        poison=_linear_attention_poison,
        registered=lambda q, k, v: ("linear_attention", (q, k, v), (1e-6,)),
        targets=BACKEND_TARGETS,
        tokens=300,
    ),
]
