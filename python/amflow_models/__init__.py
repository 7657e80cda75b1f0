"""amflow_models: video action recognition with a frozen image ViT, AM flow and adapters.

    from amflow_models import ModelConfig, build_model
    model = build_model(ModelConfig(num_classes=174, backbone="vit_base_patch14_reg4_dinov2.lvd142m",
                                    pretrained=True, variant="vanilla", tpm="lstm"))
    logits = model(video)                    # (B, T, 3, H, W) → (B, 174)

The command line is ``amflow`` (``python -m amflow_models``): synth, train, eval, visualize, demo.
"""

from amflow_kernels.nn import set_backend

from .backbone import create_backbone
from .build import ModelConfig, build_model, format_report, parameter_report
from .model import AMFlowVideoModel
from .train_config import TrainConfig
from .zeroi2v import ZeroI2V

__all__ = [
    "AMFlowVideoModel", "ModelConfig", "TrainConfig", "ZeroI2V", "build_model", "create_backbone",
    "format_report", "parameter_report", "set_backend",
]
