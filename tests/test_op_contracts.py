"""What every public op promises on every fused backend, driven by one table (op_specs.py):
bitwise determinism, NaN locality, an empty batch, gradients when only some inputs require
them, torch.library's opcheck of the registered ops, torch.compile(fullgraph=True), and the bad inputs
every op refuses alike (each op's own file keeps those of its own arguments)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import as_float64_leaves, assert_close, target_params
from op_specs import OP_SPECS

from amflow_kernels._dispatch import BACKENDS
from amflow_kernels.ops import registration

SMALL = 17  # tokens: past one 16-row tile, still quick under the interpreter
CONTRACTS = [
    pytest.param(spec, *param.values, id=f"{spec.name}-{param.id}", marks=param.marks)
    for spec in OP_SPECS
    for param in target_params(targets=spec.targets)
]


@pytest.mark.parametrize("spec, target", CONTRACTS)
def test_deterministic(spec, target, monkeypatch):
    """Two runs give bitwise-equal outputs and gradients, at a size of several blocks."""
    backend = target.backend
    inputs = spec.make(target.activate(monkeypatch), 2, spec.tokens)
    runs = []
    for _ in range(2):
        for x in inputs:
            x.grad = None
        out = spec.call(inputs, backend)
        out.backward(torch.ones_like(out).cumsum(-1))
        runs.append((out, *(x.grad for x in inputs)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("spec, target", CONTRACTS)
def test_nan_stays_in_its_slice(spec, target, monkeypatch):
    """Non-finite inputs poison exactly the outputs the reference says they do."""
    inputs = [x.detach().clone() for x in spec.make(target.activate(monkeypatch), 2, SMALL)]
    spec.poison(*inputs)
    out = spec.call(inputs, target.backend)
    ref = spec.reference([x.double() for x in inputs])
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert ref.isnan().any() and not ref.isnan().all()
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite].double(), ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, target", CONTRACTS)
def test_empty_batch(spec, target, monkeypatch):
    inputs = spec.make(target.activate(monkeypatch), 0, SMALL)
    out = spec.call(inputs, target.backend)
    assert out.shape == spec.reference(inputs).shape
    out.sum().backward()
    for x in inputs:
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("spec, target", CONTRACTS)
def test_only_some_inputs_require_grad(spec, target, monkeypatch):
    """With each input in turn not requiring grad, the others' gradients are the reference's."""
    made = spec.make(target.activate(monkeypatch), 1, SMALL)
    for frozen in range(len(made)):
        inputs = [x.detach().clone().requires_grad_(i != frozen) for i, x in enumerate(made)]
        out = spec.call(inputs, target.backend)
        grad = torch.randn_like(out)
        out.backward(grad)
        inputs64 = as_float64_leaves(*inputs)
        for i, x in enumerate(inputs64):
            x.requires_grad_(i != frozen)
        spec.reference(inputs64).backward(grad.double())
        assert inputs[frozen].grad is None
        for i, (x, x64) in enumerate(zip(inputs, inputs64)):
            if i != frozen:
                assert_close(f"input {i}'s gradient with input {frozen} frozen", x.grad, x64.grad)


@pytest.mark.parametrize("spec, target", CONTRACTS)
def test_opcheck(spec, target, monkeypatch):
    """torch.library.opcheck of the registered forward (inputs requiring grad or not) and of
    the backward, on the forward's saved outputs."""
    made = [x.detach() for x in spec.make(target.activate(monkeypatch), 2, SMALL)]
    family, tensors, extra = spec.registered(*made)
    fwd, bwd = (registration.op(family, target.backend, direction) for direction in ("fwd", "bwd"))
    for requires_grad in (True, False):
        torch.library.opcheck(fwd, (*(x.clone().requires_grad_(requires_grad) for x in tensors), *extra))
    outputs = fwd(*tensors, *extra)
    grads = [torch.randn_like(x) for x in outputs[: registration.DIFFERENTIABLE_OUTPUTS[family]]]
    saved = [outputs[i] for i in registration.SAVED_OUTPUTS[family]]
    torch.library.opcheck(bwd, (*grads, *tensors, *saved, *extra))


@pytest.mark.parametrize("spec, target", CONTRACTS)
def test_compile_fullgraph(spec, target, monkeypatch):
    """torch.compile(fullgraph=True) of the public op, forward and backward, equals eager."""
    torch._dynamo.reset()
    inputs = spec.make(target.activate(monkeypatch), 1, SMALL)

    def loss(*inputs):
        out = spec.call(inputs, target.backend)
        return (out * out).sum(), out

    value, out = torch.compile(loss, fullgraph=True)(*inputs)
    value.backward()
    grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    eager_value, eager_out = loss(*inputs)
    eager_value.backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    for grad, x in zip(grads, inputs):
        torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-6)



def _backend_limit_cases(spec):
    """What each fused backend declares it does not take for the op (dtypes; head dims beyond
    its maximum), on the device it runs: refused, naming the backend, the inputs and the limit."""
    for name, backend in BACKENDS.items():
        if not backend.fused:
            continue
        on_gpu = name == "cuda" or (name == "triton" and torch.cuda.is_available())
        device = torch.device("cuda" if on_gpu else "cpu")
        if (why := backend.unavailable(device)) is not None:
            yield pytest.param(spec, {}, None, "", id=f"{spec.name}-{name}-limits",
                               marks=pytest.mark.skip(reason=f"the {name} backend cannot run here: {why}"))
            continue
        if (lacking := backend.lacks(spec.name)) is not None:
            inputs = {n: x.to(device) for n, x in spec.blank(4, 8).items()}
            yield pytest.param(spec, {**inputs, "backend": name}, RuntimeError,
                               rf"backend '{name}' cannot run .*{re.escape(lacking)}",
                               id=f"{spec.name}-{name}-no-kernels")
            continue
        dtypes = backend.dtypes(spec.name)
        accepted = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        for dtype in [d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64) if d not in dtypes]:
            inputs = {n: x.to(device, dtype) for n, x in spec.blank(4, 8).items()}
            yield pytest.param(
                spec, {**inputs, "backend": name}, RuntimeError,
                rf"backend '{name}' cannot run .*dtype {dtype} is not supported \(accepted: {accepted}\)",
                id=f"{spec.name}-{name}-{str(dtype).removeprefix('torch.')}",
            )
        if (limit := backend.max_head_dim(spec.name)) is not None:
            inputs = {n: x.to(device, dtypes[0]) for n, x in spec.blank(4, limit + 1).items()}
            yield pytest.param(spec, {**inputs, "backend": name}, RuntimeError,
                               rf"backend '{name}' cannot run .* {limit + 1} exceeds its maximum {limit}",
                               id=f"{spec.name}-{name}-head-dim-{limit + 1}")


def _bad_input_cases(spec):
    """The bad inputs every op refuses alike, with the error and the message it gives."""
    x = spec.blank(4, 8)
    cases = {
        "q-not-a-tensor": ({**x, "q": [1.0]}, TypeError, "q must be a torch.Tensor, got list"),
        "integer-dtype": ({n: t.int() for n, t in x.items()}, TypeError,
                          r"q.dtype must be one of float16, bfloat16, float32, float64, got torch.int32"),
        "k-dtype-differs": ({**x, "k": x["k"].double()}, TypeError,
                            r"k.dtype must equal q.dtype \(torch.float32\), got torch.float64"),
        "k-device-differs": ({**x, "k": x["k"].to("meta")}, ValueError,
                             r"k.device must equal q.device \(cpu\), got meta"),
        "no-tokens": (spec.blank(0, 8), ValueError,
                      r"q[, kv]* (must have|need) at least one token and one channel \(.* ≥ 1\), got .*0, 8\)"),
        "unknown-backend": ({**x, "backend": "cudnn"}, ValueError,
                            r"backend must be one of \('auto', 'reference', 'triton', 'cuda', 'cpu'\), got 'cudnn'"),
        "cuda-backend-on-cpu": ({**x, "backend": "cuda"}, RuntimeError,
                                r"backend 'cuda' cannot run .*(runs CUDA tensors, not cpu|not available)"),
    }
    for label, (inputs, error, message) in cases.items():
        yield pytest.param(spec, inputs, error, message, id=f"{spec.name}-{label}")
    yield from _backend_limit_cases(spec)


@pytest.mark.parametrize("spec, inputs, error, message", [case for spec in OP_SPECS for case in _bad_input_cases(spec)])
def test_bad_input(spec, inputs, error, message):
    """A clear error that names the op, the argument, the value and what is accepted."""
    with pytest.raises(error, match=rf"^{spec.name}: {message}"):
        spec.function(**inputs)
