"""Models: any timm backbone with a chest X-ray head, 1-channel input and pretrained sources."""

from cxrkit.models.factory import CXRModel, cam_reshape_transform, cam_target_layer, create_model, layer_groups
from cxrkit.models.pretrained import LoadReport, PretrainedWeightsError

__all__ = [
    "CXRModel",
    "LoadReport",
    "PretrainedWeightsError",
    "cam_reshape_transform",
    "cam_target_layer",
    "create_model",
    "layer_groups",
]
