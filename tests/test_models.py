"""The model package: AM flow video models, ZeroI2V, and their parts, on tiny timm ViTs."""

from __future__ import annotations

import pytest
import torch
from amflow_models import (
    AMFlowVideoModel,
    ModelConfig,
    ZeroI2V,
    build_model,
    create_backbone,
    parameter_report,
    set_backend,
)
from amflow_models.tpm import TPM_KINDS

from amflow_kernels import reference

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4)


def tiny_backbone(**overrides):
    return create_backbone("vit_tiny_patch16_224", **{**TINY, **overrides})


def randomise_adapters(model, std=0.2):
    """Adapters start as the identity (W_up = 0); give them random weights so tests see them."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and name.startswith("adapters"):
                parameter.normal_(0, std)


def block_inputs(model, video):
    """Run the model once and return the tokens entering each backbone block."""
    inputs = {}
    hooks = [block.norm1.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, a[0]))
             for i, block in enumerate(model.backbone.blocks, start=1)]
    try:
        out = model(video)
    finally:
        for hook in hooks:
            hook.remove()
    return out, inputs


@pytest.mark.parametrize("tpm", TPM_KINDS)
@pytest.mark.parametrize("flow", ["none", "vanilla", "aligned"])
def test_am_flow_model_shapes_and_gradients(flow, tpm):
    model = AMFlowVideoModel(tiny_backbone(), 5, flow=flow, tpm=tpm, adapter_dim=8, aligner_dim=24).train()
    video = torch.randn(2, 4, 3, 32, 32)
    logits = model(video)
    assert logits.shape == (2, 5) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    logits.square().sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters()), "the frozen backbone received gradient"
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    assert all(p.grad.abs().sum() > 0 for n, p in trainable if n.endswith("up.weight")), "adapters learn nothing"
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training, "train() must keep the frozen backbone in eval mode"


@pytest.mark.parametrize("flow", ["vanilla", "aligned"])
def test_flow_only_model_reads_the_flow_alone(flow):
    """The diagnostic: MHSA adapters on the flow alone, no MLP adapters, no frame head; its logits
    are the mean of one TPM per block, and a video's content reaches them only through the flow."""
    model = AMFlowVideoModel(tiny_backbone(), 5, flow=flow, flow_only=True, adapter_dim=8, aligner_dim=24)
    features = model.flows["1"].features
    assert all(set(parts) == {"attn"} for parts in model.adapters.values()) and model.frame_head is None
    assert all(parts["attn"].down.in_features == features for parts in model.adapters.values())
    assert all(set(parts) == {"attn"} for parts in model.tpms.values())
    video = torch.randn(2, 4, 3, 32, 32)
    logits = model(video)
    tpm_logits = []
    hooks = [tpm["attn"].register_forward_hook(lambda m, a, out: tpm_logits.append(out)) for tpm in model.tpms.values()]
    model(video)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(logits, torch.stack(tpm_logits).mean(0), rtol=0, atol=0)
    # a still clip has zero vanilla flow however bright it is: the logits cannot tell two still clips apart
    if flow == "vanilla":
        still = torch.randn(1, 1, 3, 32, 32).expand(2, 4, 3, 32, 32).clone()
        brighter = still + torch.tensor([0.0, 1.0]).view(2, 1, 1, 1, 1)
        logits = model(brighter)
        torch.testing.assert_close(logits[0], logits[1])


@pytest.mark.parametrize("flow", ["vanilla", "aligned"])
def test_clip_norm_standardises_each_channel_over_a_clip(flow):
    """flow_norm="clip" is ``(f − mean) / (std + 1e-6)`` of the papers' flow f, per clip and
    channel over its tokens and frame pairs; the last frame, which has no successor, stays 0.
    The papers' vanilla flow sums to N over the tokens."""
    flows = {}
    for norm in ("none", "clip"):
        torch.manual_seed(0)
        model = AMFlowVideoModel(tiny_backbone(), 5, flow=flow, flow_norm=norm, adapter_dim=8, aligner_dim=24)
        torch.manual_seed(1)
        flows[norm] = model(torch.randn(3, 5, 3, 32, 32), return_flows=True)[1]
    for block, raw in flows["none"].items():
        pairs = raw[:, :-1].double()
        mean, std = pairs.mean(dim=(1, 2), keepdim=True), pairs.std(dim=(1, 2), keepdim=True, correction=0)
        torch.testing.assert_close(flows["clip"][block][:, :-1].double(), (pairs - mean) / (std + 1e-6),
                                   rtol=1e-4, atol=1e-4)
        assert (flows["clip"][block][:, -1] == 0).all() and std.min() > 1e-4, "the check needs a flow that varies"
        if flow == "vanilla":
            tokens = raw.shape[2]
            torch.testing.assert_close(raw[:, :-1].sum(2), torch.full_like(raw[:, :-1, 0], float(tokens)))


def test_float64_model_runs_the_fused_cpu_kernels():
    model = AMFlowVideoModel(tiny_backbone(), 3, flow="aligned", adapter_dim=8, aligner_dim=24).double()
    logits = model(torch.randn(1, 3, 3, 32, 32, dtype=torch.float64))
    assert logits.dtype == torch.float64
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("offset", [1, 2])
def test_captured_flow_equals_the_reference_on_recomputed_qk(offset):
    model = AMFlowVideoModel(tiny_backbone(), 4, flow="vanilla", offset=offset, adapter_dim=8).double()
    randomise_adapters(model)
    video = torch.randn(2, 5, 3, 32, 32, dtype=torch.float64)
    (_, flows) = model(video, return_flows=True)
    _, inputs = block_inputs(model, video)
    for number, block in enumerate(model.backbone.blocks, start=1):
        attn = block.attn
        h = block.norm1(inputs[number])
        qkv = attn.qkv(h).reshape(*h.shape[:2], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qkv[0].unflatten(0, (2, 5)), qkv[1].unflatten(0, (2, 5))
        expected = reference.am_flow(q, k, offset=offset, scale=attn.scale)  # (B, T−Δ, H, N)
        got = flows[number]  # (B, T, N, H)
        torch.testing.assert_close(got[:, :-offset], expected.transpose(-1, -2), rtol=1e-10, atol=1e-10)
        assert (got[:, -offset:] == 0).all(), "frames without a successor must get zero flow"


def test_adapted_block_is_timm_block_plus_adapters():
    model = AMFlowVideoModel(tiny_backbone(), 4, flow="none", adapter_blocks=[2], adapter_dim=8).double()
    randomise_adapters(model)
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    _, inputs = block_inputs(model, video)
    block, adapters = model.backbone.blocks[1], model.adapters["2"]
    x = inputs[2]
    x = x + block.ls1(block.attn(block.norm1(x))) + adapters["attn"](block.norm1(x))[0]
    x = x + block.ls2(block.mlp(block.norm2(x))) + adapters["mlp"](block.norm2(x))[0]
    torch.testing.assert_close(inputs[3], x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inputs[2], model.backbone.blocks[0](inputs[1]), rtol=1e-10, atol=1e-10)


def test_untrained_adapters_leave_the_backbone_unchanged():
    backbone = tiny_backbone(num_classes=4).double()
    model = AMFlowVideoModel(backbone, 4, flow="vanilla", tpm="tcn", adapter_dim=8).double()
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    _, inputs = block_inputs(model, video)
    features = backbone.forward_features(video.flatten(0, 1))
    torch.testing.assert_close(backbone.norm(backbone.blocks[-1](inputs[3])), features, rtol=1e-10, atol=1e-10)
    assert model.frame_head is None, "a backbone with num_classes outputs keeps its own (frozen) head"


def test_backend_reference_and_auto_agree():
    model = AMFlowVideoModel(tiny_backbone(), 4, flow="aligned", adapter_dim=8, aligner_dim=24).double()
    randomise_adapters(model)
    video = torch.randn(2, 4, 3, 32, 32, dtype=torch.float64)
    fused = model(video)
    set_backend(model, "reference")
    assert all(m.backend == "reference" for m in model.modules() if hasattr(m, "backend"))
    torch.testing.assert_close(model(video), fused, rtol=1e-9, atol=1e-9)


def test_zeroi2v_merge_keeps_outputs_and_backbone_parameter_count():
    model = ZeroI2V(tiny_backbone(), 6, adapter_dim=8).double().eval()
    randomise_adapters(model)
    with torch.no_grad():
        for adapter in (a for block in model.adapters.values() for a in block.values()):
            adapter.scale.normal_()
    video = torch.randn(2, 4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(video)
        merged = model.merge()(video)
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
    plain = create_backbone("vit_tiny_patch16_224", **TINY, num_classes=6)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert len(model.adapters) == 0


def test_zeroi2v_without_temporal_heads_is_the_image_model_averaged_over_frames():
    backbone = tiny_backbone(num_classes=6).double()
    model = ZeroI2V(backbone, 6, temporal_heads={}, adapter_dim=8).double().eval()
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = backbone(video.flatten(0, 1)).unflatten(0, (2, 3)).mean(1)
        torch.testing.assert_close(model(video), expected, rtol=1e-10, atol=1e-10)


def test_stdha_heads_read_the_neighbouring_frames():
    model = ZeroI2V(tiny_backbone(), 6, temporal_heads={0: -1, 2: 1}, adapter_dim=8)
    frames, heads = 4, 4
    k = torch.arange(frames, dtype=torch.float32).view(1, frames, 1, 1, 1).expand(2, frames, heads, 3, 2)
    k = k.flatten(0, 1)  # value = frame index
    shifted, _ = model._shift(frames, heads, k.device)(k, k)
    source = shifted.unflatten(0, (2, frames))[0, :, :, 0, 0]  # (T, H): which frame each head read
    assert source[:, 0].tolist() == [0, 0, 1, 2]    # t−1, the first frame keeps its own
    assert source[:, 2].tolist() == [1, 2, 3, 3]    # t+1, the last frame keeps its own
    assert source[:, 1].tolist() == source[:, 3].tolist() == [0, 1, 2, 3]


def test_zeroi2v_trains_only_adapters_and_classifier():
    model = ZeroI2V(tiny_backbone(), 6, adapter_dim=8).train()
    model(torch.randn(2, 3, 3, 32, 32)).sum().backward()
    for name, parameter in model.named_parameters():
        head = name.startswith("backbone.head")
        assert parameter.requires_grad == (head or name.startswith("adapters")), name
        assert (parameter.grad is not None) == parameter.requires_grad, name


def test_parameter_report_counts_every_parameter():
    config = ModelConfig(num_classes=5, backbone="vit_tiny_patch16_224", backbone_kwargs=TINY, variant="aligned",
                         adapter_dim=8, aligner_dim=24, flow_blocks=[1, 3])
    model = build_model(config)
    report = parameter_report(model)
    total = sum(p.numel() for p in model.parameters())
    assert report["total"]["trainable"] + report["total"]["frozen"] == total
    assert report["backbone (ViT)"]["trainable"] == 0
    assert report["AM flow (aligning encoders)"]["trainable"] > 0
    assert set(model.flows) == {"1", "3"}


def test_pretrained_weights_that_cannot_load_say_how_to_supply_them(monkeypatch):
    import timm

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        raise AssertionError("only the pretrained path is tried here")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ValueError, match=r"timm's pretrained weights for 'vit_base_patch14_dinov2.lvd142m' cannot "
                                         r"be loaded \(We couldn't connect .*\); without network access, download "
                                         r"them on another machine and pass their file as checkpoint_path"):
        create_backbone("vit_base_patch14_dinov2.lvd142m", pretrained=True, img_size=224)


def test_am2_layout_adapters_everywhere_flow_and_tpms_in_first_and_last_blocks():
    """The AVSS paper's AM/2(1,12) on a 3-block ViT: AM/2(1,3). Only blocks 1 and 3 feed TPMs, so
    the logits average 2·2 TPM heads and the last-frame head; block 2 still adapts the stream."""
    config = ModelConfig(num_classes=5, backbone="vit_tiny_patch16_224", backbone_kwargs=TINY, variant="vanilla",
                         adapter_dim=8, flow_blocks=[1, 3], tpm_blocks=[1, 3])
    model = build_model(config).double()
    randomise_adapters(model)
    assert set(model.adapters) == {"1", "2", "3"} and set(model.flows) == set(model.tpms) == {"1", "3"}
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    heads = []
    hooks = [m.head.register_forward_hook(lambda m, a, out: heads.append(out)) for t in model.tpms.values()
             for m in t.values()]
    frame = model.frame_head.register_forward_hook(lambda m, a, out: heads.append(out))
    logits = model(video)
    for hook in (*hooks, frame):
        hook.remove()
    assert len(heads) == 5
    torch.testing.assert_close(logits, torch.stack(heads).mean(0))
    with torch.no_grad():  # block 2's adapters change the output though no TPM reads them
        model.adapters["2"]["mlp"].up.weight.zero_()
        model.adapters["2"]["mlp"].up.bias.zero_()
    assert not torch.allclose(model(video), logits)
    with pytest.raises(ValueError, match=r"tpm_blocks \(1, 3\) must be adapted blocks"):
        AMFlowVideoModel(tiny_backbone(), 4, adapter_blocks=[1, 2], tpm_blocks=[1, 3])


def test_adapter_activation_is_the_papers_relu_unless_asked():
    model = build_model(ModelConfig(num_classes=4, backbone="vit_tiny_patch16_224", backbone_kwargs=TINY))
    assert all(isinstance(a.act, torch.nn.ReLU) for parts in model.adapters.values() for a in parts.values())
    gelu = AMFlowVideoModel(tiny_backbone(), 4, adapter_dim=8, adapter_activation="gelu")
    assert isinstance(gelu.adapters["1"]["attn"].act, torch.nn.GELU)
    # a checkpoint written before the activation was a setting rebuilds as it was trained: GELU
    assert ModelConfig.from_dict({"num_classes": 4}).adapter_activation == "gelu"
    assert ModelConfig.from_dict(ModelConfig(num_classes=4).to_dict()).adapter_activation == "relu"
    with pytest.raises(ValueError, match="activation must be one of relu, gelu, got 'tanh'"):
        AMFlowVideoModel(tiny_backbone(), 4, adapter_activation="tanh")


def test_zeroi2v_config_heads_and_quarter_width_bottleneck():
    """Table 11's head offsets from the config (head 0 first); bottleneck = width / 4 by default."""
    config = ModelConfig(num_classes=4, backbone="vit_tiny_patch16_224", backbone_kwargs={**TINY, "num_heads": 6},
                         variant="zeroi2v", temporal_heads=[-1, 1, -2, 2, 3])
    model = build_model(config)
    assert model.temporal_heads == {0: -1, 1: 1, 2: -2, 3: 2, 4: 3}
    assert model.adapters["1"]["qkv"].down.out_features == TINY["embed_dim"] // 4
    assert ZeroI2V(tiny_backbone(num_heads=16, embed_dim=64), 4).temporal_heads == {0: -1, 1: -1, 2: 1, 3: 1}
    with pytest.raises(ValueError, match="temporal_heads is a ZeroI2V setting; variant 'vanilla' has no STDHA"):
        build_model(ModelConfig(num_classes=4, backbone="vit_tiny_patch16_224", backbone_kwargs=TINY,
                                temporal_heads=[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("flow", ["vanilla", "aligned"])
def test_bf16_autocast_on_gpu_matches_the_reference_kernels(flow):
    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA device: the model's bf16 path runs the triton/cuda kernels")
    model = AMFlowVideoModel(tiny_backbone(), 4, flow=flow, adapter_dim=8, aligner_dim=24).cuda()
    randomise_adapters(model, std=0.05)
    video = torch.randn(2, 4, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = model(video)
        set_backend(model, "reference")
        eager = model(video)
    assert torch.isfinite(fused).all()
    assert (fused - eager).norm() / eager.norm() < 2e-2


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: AMFlowVideoModel(tiny_backbone(), 4, tpm="gru"),
         "tpm must be one of lstm, tcn, transformer, got 'gru'"),
        (lambda: AMFlowVideoModel(tiny_backbone(), 4, flow="optical"), "flow must be one of none, vanilla, aligned"),
        (lambda: AMFlowVideoModel(tiny_backbone(), 4, flow_blocks=[0, 2]),
         r"flow_blocks must be block numbers in 1..3"),
        (lambda: AMFlowVideoModel(tiny_backbone(), 4, adapter_blocks=[1], flow_blocks=[2]), "must be adapted blocks"),
        (lambda: AMFlowVideoModel(tiny_backbone(), 0), "num_classes"),
        (lambda: ZeroI2V(tiny_backbone(), 4, temporal_heads={7: 1}), r"temporal_heads must map heads in 0..3"),
        (lambda: create_backbone("no_such_vit"), "name 'no_such_vit' is not a timm model"),
        (lambda: create_backbone("vit_tiny_patch16_224", checkpoint_path="/nonexistent.pt"), "checkpoint_path"),
        (lambda: create_backbone("resnet18"), "is not a timm VisionTransformer"),
        (lambda: build_model(ModelConfig(num_classes=3, variant="video")), "variant must be one of"),
        (lambda: ModelConfig.from_dict({"num_classes": 3, "colour": 1}), r"unknown fields \['colour'\]"),
        (lambda: AMFlowVideoModel(tiny_backbone(), 4, flow="none", flow_only=True), "flow_only needs AM flow"),
        (lambda: AMFlowVideoModel(tiny_backbone(), 4, flow_blocks=[1], flow_only=True), "flow_only needs AM flow"),
        (lambda: AMFlowVideoModel(tiny_backbone(), 4, flow_norm="batch"), "flow_norm must be one of none, clip"),
        (lambda: build_model(ModelConfig(num_classes=3, backbone="vit_tiny_patch16_224", backbone_kwargs=TINY,
                                         variant="zeroi2v", flow_only=True)), "zeroi2v' has no AM flow"),
    ],
)
def test_bad_configurations(build, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        build()


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((2, 1, 3, 32, 32), torch.float32, "at least 2 frames"),
        ((2, 4, 1, 32, 32), torch.float32, "must have 3 channels"),
        ((2, 4, 3, 24, 32), torch.float32, r"frames must be \(32, 32\) pixels"),
        ((4, 3, 32, 32), torch.float32, r"video must have shape \(B, T, C, H, W\)"),
        ((2, 4, 3, 32, 32), torch.uint8, "must be a float tensor"),
    ],
)
def test_bad_videos(shape, dtype, match):
    model = AMFlowVideoModel(tiny_backbone(), 4, adapter_dim=8)
    with pytest.raises((ValueError, TypeError), match=match):
        model(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_aligned_flow_from_the_blocks_attention_equals_the_second_pass(backend, monkeypatch):
    """The aligned variant's column sums come from amflow_kernels.attention beside the block's
    output; with that turned off (SDPA, then attention_colsum: the two passes it replaces) the
    logits and every trainable gradient are the same up to rounding."""
    from amflow_models.flow import AlignedFlow

    model = AMFlowVideoModel(tiny_backbone(), 4, flow="aligned", adapter_dim=8, aligner_dim=24, backend=backend)
    model = model.double()
    randomise_adapters(model)
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)

    def step():
        model.zero_grad()
        logits = model(video)
        logits.square().sum().backward()
        return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    one_pass, grads = step()
    monkeypatch.setattr(AlignedFlow, "colsum_backend", None)
    two_passes, expected = step()
    torch.testing.assert_close(one_pass, two_passes, rtol=1e-10, atol=1e-10)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
