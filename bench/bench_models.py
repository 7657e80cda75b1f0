"""The model package end to end: one inference step and one training step (forward, backward,
optimiser step) of the AM flow video model on ViT-B/14 with registers (random weights, AM flow
in all 12 blocks, "AM/12"), with the fused kernels (``backend="auto"``) against the same model
on the reference ops (``backend="reference"``: the N×N maps in PyTorch). The aligned variant
also runs as it did before ``amflow_kernels.attention`` (provider "fused, two passes": SDPA for
the blocks' attention, then ``attention_colsum`` for the aligning encoder's input).

CUDA: B=8 clips of T=8 frames at 224 px, bf16 autocast (target: the fused kernels ≥ 2× faster
and ≥ 3× less peak memory). CPU: B=1, T=4, float32, the machine's threads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from amflow_models import AMFlowVideoModel, create_backbone
from helpers import require_backend

SHAPES = {"cuda": {"vit_base_patch14_reg4_dinov2 B8 T8": (8, 8)}, "cpu": {"vit_base_patch14_reg4_dinov2 B1 T4": (1, 4)}}
WORKLOADS = [(device, name, flow, backend) for device in ("cuda", "cpu") for name in SHAPES[device]
             for flow in ("vanilla", "aligned") for backend in ("auto", "reference")]
WORKLOADS += [(device, name, "aligned", "two passes") for device, name, flow, backend in WORKLOADS
              if flow == "aligned" and backend == "auto"]
PROVIDERS = {"auto": "fused", "reference": "reference", "two passes": "fused, two passes"}


def _model(flow: str, backend: str, device: str) -> AMFlowVideoModel:
    torch.manual_seed(0)
    backbone = create_backbone("vit_base_patch14_reg4_dinov2", img_size=224, num_classes=0)
    return AMFlowVideoModel(backbone, 174, flow=flow, tpm="lstm", backend=backend).to(device)


@pytest.mark.parametrize("mode", ["inference", "train step"])
@pytest.mark.parametrize("device, shape_name, flow, backend", WORKLOADS)
def test_am_flow_model(device, shape_name, flow, backend, mode, measure, monkeypatch):
    require_backend("reference", device)
    batch, frames = SHAPES[device][shape_name]
    provider = PROVIDERS[backend]
    if backend == "two passes":
        from amflow_models.flow import AlignedFlow

        monkeypatch.setattr(AlignedFlow, "colsum_backend", None)
        backend = "auto"
    model = _model(flow, backend, device)
    video = torch.randn(batch, frames, 3, 224, 224, device=device)
    labels = torch.randint(0, 174, (batch,), device=device)
    if device == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = torch.autocast("cpu", enabled=False)
    if backend == "auto":  # the fused model must agree with the reference one on these inputs
        reference_model = _model(flow, "reference", device)
        with torch.no_grad(), autocast:
            fused, expected = model(video).float(), reference_model(video).float()
        del reference_model
        assert (fused - expected).norm() / expected.norm() < (2e-2 if device == "cuda" else 1e-4)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def inference():
        with torch.no_grad(), autocast:
            model.eval()(video)

    def train_step():
        model.train()
        with autocast:
            loss = F.cross_entropy(model(video).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    run = inference if mode == "inference" else train_step
    measure(f"AMFlowVideoModel {flow}", device, shape_name, mode, provider, run, parameters, fused=backend == "auto")
