"""The papers' presets: each builds the model its paper describes (on a tiny 12-block ViT, as the
real backbones cannot load here), and flags given on the command line override a preset; without
a preset, ``amflow train``'s flags default to the configs' own fields."""

from __future__ import annotations

import pytest
import torch
from amflow_models import AMFlowVideoModel, ModelConfig, TrainConfig, ZeroI2V, build_model, parameter_report
from amflow_models.cli import build_parser, data_config, main, model_config, train_config
from amflow_models.data.loader import DataConfig
from amflow_models.presets import PRESETS

# 12 blocks, as ViT-B, so that block numbers like AM/2(1,12) mean what they mean on the real backbone
TINY_VIT_B = ["--backbone", "vit_tiny_patch16_224", *(f"--backbone-arg={kv}" for kv in (
    "img_size=32", "patch_size=8", "embed_dim=48", "depth=12", "num_heads=12"))]
REQUIRED = ["--train-list", "train.txt", "--val-list", "val.txt", "--out", "run", "--random-init"]


def _parse(name: str, *flags: str):
    return build_parser(PRESETS[name].defaults).parse_args(["train", "--preset", name, *REQUIRED, *flags])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_the_model_its_paper_describes(name):
    preset, args = PRESETS[name], _parse(name, *TINY_VIT_B)
    for flag, value in preset.defaults.items():
        if flag != "backbone":
            assert getattr(args, flag) == value, flag
    model = build_model(model_config(args, preset.num_classes))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    if preset.specified["variant"] == "zeroi2v":
        assert isinstance(model, ZeroI2V)
        assert model.temporal_heads == dict(enumerate(preset.specified["temporal_heads"]))
        assert model.adapters["1"]["qkv"].down.out_features == 48 // 4  # bottleneck ratio 0.25
        assert trainable == {"adapters", "backbone"}  # backbone: only its classifier
        assert {n for n, p in model.backbone.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    else:
        assert isinstance(model, AMFlowVideoModel) and model.flow_kind == preset.specified["variant"]
        assert all(isinstance(a.act, torch.nn.ReLU) for parts in model.adapters.values() for a in parts.values())
        assert model.adapter_blocks == tuple(range(1, 13))
        expected = tuple(preset.specified.get("tpm_blocks", range(1, 13)))
        assert model.tpm_blocks == expected and model.flow_blocks == expected
        assert trainable <= {"flows", "adapters", "tpms", "frame_head"}
        assert parameter_report(model)["backbone (ViT)"]["trainable"] == 0


def test_am2_preset_has_exactly_two_tpm_blocks():
    model = build_model(model_config(_parse("amflow-smarthome-am2", *TINY_VIT_B), 31))
    assert set(model.tpms) == {"1", "12"} and len(model.adapters) == 12 and set(model.flows) == {"1", "12"}


def test_flags_given_override_the_preset():
    args = _parse("zeroi2v-k400-16f", "--num-frames", "12", "--lr", "1e-4")
    assert (args.num_frames, args.lr, args.batch_size, args.label_smoothing) == (12, 1e-4, 64, 0.1)
    plain = build_parser().parse_args(["train", *REQUIRED])
    assert (plain.num_frames, plain.lr, plain.label_smoothing, plain.variant) == (8, 1e-3, 0.0, "vanilla")


def test_train_flags_default_to_the_configs_fields():
    plain = build_parser().parse_args(["train", *REQUIRED])
    assert model_config(plain, 5) == ModelConfig(num_classes=5)
    assert data_config(plain) == DataConfig(train_list="train.txt", val_list="val.txt")
    assert train_config(plain) == TrainConfig()


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "0"], "epochs must be ≥ 1, got 0"),
    (["--val-clips", "0", "--max-bad-clips", "-1"], "val_clips must be ≥ 1, got 0; max_bad_clips must be ≥ 0, got -1"),
    (["--lr", "0"], "lr must be > 0, got 0.0"),
    (["--label-smoothing", "1"], r"label_smoothing must be in \[0, 1\), got 1.0"),
])
def test_train_settings_out_of_range_are_refused_naming_each(flags, message, capsys):
    with pytest.raises(ValueError, match=message):
        train_config(build_parser().parse_args(["train", *REQUIRED, *flags]))
    assert main(["train", *REQUIRED, *flags]) == 2
    assert message.replace("\\", "") in capsys.readouterr().err


def test_presets_command_lists_and_describes(capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PRESETS)
    assert main(["presets", "zeroi2v-ssv2-16f"]) == 0
    text = capsys.readouterr().out
    assert "the paper specifies: --variant zeroi2v --lr 0.0003 --batch-size 64" in text
    assert "--temporal-heads 1,-1,2,-2" in text and "this package chose" in text and "trainable" in text
    assert "--val-clips 1 --val-crops 3" in text and "86 M parameters (CLIP ViT-B/16), 0 M added at inference" in text
    assert main(["presets", "amflow-k400"]) == 0
    assert "model size the paper's authors report: not in the texts" in capsys.readouterr().out
