"""2D U-Net of Torda et al. (2024) in Flax (linen), channels-last.

Encoder widths ``width * 2**k`` for k < depth, bridge ``width * 2**depth``; each block is twice
[3x3 conv (same) -> norm -> ReLU]; 2x2 max-pool down; 2x2 stride-2 transposed conv up, then
concat with the skip; a 1x1 conv head (``head``) to ``num_classes`` logits. At width 64, depth 4,
4 input channels and 4 classes this has 31,038,404 trainable parameters (about 31.0M; convolutions followed by
BatchNorm carry no bias).

The last hidden feature map (``width`` channels, full resolution) is what the head sees; the
class-wise influence of the ``head`` subset and the faithfulness analysis both use it, so
``UNet.__call__(..., return_features=True)`` returns ``(logits, features)``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tracin_jax.config import ModelConfig


def _norm(kind: str, features: int, train: bool, name: str, bn_momentum: float = 0.99) -> nn.Module | None:
    if kind == "batch":
        # Momentum 0.99 by default, as Keras' default, which the paper's model used. The running
        # statistics then need a few hundred steps to forget their start (mean 0, variance 1);
        # short runs (the demo) use a lower momentum so that inference-mode outputs are usable.
        return nn.BatchNorm(use_running_average=not train, momentum=bn_momentum, epsilon=1e-3,
                            name=name)
    if kind == "group":
        return nn.GroupNorm(num_groups=min(8, features), name=name)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}")


class ConvBlock(nn.Module):
    """Two [3x3 conv -> norm -> ReLU]. x: f32[B,H,W,Cin] -> f32[B,H,W,features]."""

    features: int
    norm: str = "batch"
    bn_momentum: float = 0.99

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=self.norm == "none",
                        name=f"conv{i}")(x)
            norm = _norm(self.norm, self.features, train, f"norm{i}", self.bn_momentum)
            if norm is not None:
                x = norm(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    """x: f32[B,H,W,Cin] -> logits f32[B,H,W,num_classes] (and features f32[B,H,W,width])."""

    width: int = 64
    depth: int = 4
    norm: str = "batch"
    num_classes: int = 4
    bn_momentum: float = 0.99  # BatchNorm running-statistics momentum

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        skips = []
        for k in range(self.depth):
            x = ConvBlock(self.width * 2**k, self.norm, self.bn_momentum, name=f"enc{k}")(x, train)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = ConvBlock(self.width * 2**self.depth, self.norm, self.bn_momentum, name="bridge")(x, train)
        for k in reversed(range(self.depth)):
            x = nn.ConvTranspose(self.width * 2**k, (2, 2), strides=(2, 2), name=f"up{k}")(x)
            x = jnp.concatenate([x, skips[k]], axis=-1)
            x = ConvBlock(self.width * 2**k, self.norm, self.bn_momentum, name=f"dec{k}")(x, train)
        features = x
        logits = nn.Conv(self.num_classes, (1, 1), name="head")(features)
        if return_features:
            return logits, features
        return logits


def build_unet(cfg: ModelConfig) -> UNet:
    return UNet(width=cfg.width, depth=cfg.depth, norm=cfg.norm, num_classes=cfg.num_classes,
                bn_momentum=cfg.bn_momentum)


def count_params(params: Any) -> int:
    import jax

    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
