from tracin_jax.models.unet import UNet, build_unet, count_params

__all__ = ["UNet", "build_unet", "count_params"]
