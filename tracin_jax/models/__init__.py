from tracin_jax.models.attention_unet import AttentionUNet
from tracin_jax.models.deepseg import DeepSeg
from tracin_jax.models.interface import features_apply, has_features, head_name, head_params
from tracin_jax.models.registry import (ARCHITECTURE_DIMS, ARCHITECTURES, build_model,
                                        check_dims, known_architectures, register_architecture,
                                        supported_dims)
from tracin_jax.models.resunet import ResUNet
from tracin_jax.models.unet import UNet, build_unet, count_params

__all__ = ["ARCHITECTURES", "ARCHITECTURE_DIMS", "AttentionUNet", "DeepSeg", "ResUNet", "UNet",
           "build_model", "build_unet", "check_dims", "count_params", "features_apply",
           "has_features", "head_name", "head_params", "known_architectures",
           "register_architecture", "supported_dims"]
