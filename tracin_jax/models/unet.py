"""U-Net of Torda et al. (2024) in Flax (linen), channels-last, 2D or 3D (``dims``).

Encoder widths ``width * 2**k`` for k < depth, bridge ``width * 2**depth``; each block is twice
[3x3 conv (same) -> norm -> ReLU]; 2x2 max-pool down; 2x2 stride-2 transposed conv up, then
concat with the skip; a 1x1 conv head (``head``) to ``num_classes`` logits. At width 64, depth 4,
4 input channels and 4 classes this has 31,038,404 trainable parameters (about 31.0M; convolutions followed by
BatchNorm carry no bias).

The last hidden feature map (``width`` channels, full resolution) is what the head sees; the
class-wise influence of the ``head`` subset and the faithfulness analysis both use it, so
``UNet.__call__(..., return_features=True)`` returns ``(logits, features)``.

Every built-in architecture is written once for both dimensionalities: ``dims=2`` (the default)
takes slices f32[B,H,W,Cin], ``dims=3`` volumes f32[B,D,H,W,Cin], with the same layer names (a
3x3 conv becomes 3x3x3, a 2x2 pooling or transposed conv 2x2x2, the head 1x1x1). The 2D
parameter trees and outputs are those of the 2D-only code this replaced. Every spatial size must
be divisible by ``2**depth``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax.numpy as jnp

if TYPE_CHECKING:  # annotations only: the config validates model.arch against the models
    from tracin_jax.config import ModelConfig


def cube(k: int, dims: int) -> tuple[int, ...]:
    """(k,) * dims: a kernel, window or stride of side k in ``dims`` spatial dimensions."""
    return (k,) * dims


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
    """Two [3x3 conv -> norm -> ReLU] (3x3x3 with ``dims=3``).
    x: f32[B,*S,Cin] -> f32[B,*S,features], S the ``dims`` spatial sizes."""

    features: int
    norm: str = "batch"
    bn_momentum: float = 0.99
    dims: int = 2

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(2):
            x = nn.Conv(self.features, cube(3, self.dims), padding="SAME",
                        use_bias=self.norm == "none", name=f"conv{i}")(x)
            norm = _norm(self.norm, self.features, train, f"norm{i}", self.bn_momentum)
            if norm is not None:
                x = norm(x)
            x = nn.relu(x)
        return x


def encoder(net: nn.Module, x, train: bool):
    """The encoder the U-Net family shares (U-Net, DeepSeg, Attention U-Net): ``net.depth``
    ConvBlocks ``enc{k}`` (width * 2**k features) each followed by 2x2 (2x2x2) max-pooling, then
    the ``bridge`` block. Called inside ``net``'s compact ``__call__``, so the blocks are its
    children.

    x: f32[B,*S,C] -> (f32[B,*S/2**depth,width*2**depth], skips: list of the depth encoder
    outputs, f32[B,*S/2**k,width*2**k]); S the ``net.dims`` spatial sizes.
    """
    skips = []
    for k in range(net.depth):
        x = ConvBlock(net.width * 2**k, net.norm, net.bn_momentum, net.dims,
                      name=f"enc{k}")(x, train)
        skips.append(x)
        x = nn.max_pool(x, cube(2, net.dims), strides=cube(2, net.dims))
    x = ConvBlock(net.width * 2**net.depth, net.norm, net.bn_momentum, net.dims,
                  name="bridge")(x, train)
    return x, skips


def head(net: nn.Module, features, return_features: bool):
    """The 1x1 (1x1x1) classifier ``head`` every architecture ends with: features f32[B,*S,F] ->
    logits f32[B,*S,num_classes] (and the features, with ``return_features``)."""
    logits = nn.Conv(net.num_classes, cube(1, net.dims), name="head")(features)
    return (logits, features) if return_features else logits


class SegmentationNet(nn.Module):
    """The fields every built-in architecture has; subclasses define ``__call__``:
    x: f32[B,*S,Cin] -> logits f32[B,*S,num_classes] (and features f32[B,*S,width]), S = (H, W)
    with ``dims=2``, (D, H, W) with ``dims=3``."""

    width: int = 64
    depth: int = 4
    norm: str = "batch"
    num_classes: int = 4
    bn_momentum: float = 0.99  # BatchNorm running-statistics momentum
    dims: int = 2  # spatial dimensions: 2 (slices) or 3 (volumes)


class UNet(SegmentationNet):
    """x: f32[B,*S,Cin] -> logits f32[B,*S,num_classes] (and features f32[B,*S,width])."""

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x, skips = encoder(self, x, train)
        two = cube(2, self.dims)
        for k in reversed(range(self.depth)):
            x = nn.ConvTranspose(self.width * 2**k, two, strides=two, name=f"up{k}")(x)
            x = jnp.concatenate([x, skips[k]], axis=-1)
            x = ConvBlock(self.width * 2**k, self.norm, self.bn_momentum, self.dims,
                          name=f"dec{k}")(x, train)
        return head(self, x, return_features)


def net_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The :class:`SegmentationNet` fields of a ModelConfig (``dims`` 2 when it has none)."""
    return dict(width=cfg.width, depth=cfg.depth, norm=cfg.norm, num_classes=cfg.num_classes,
                bn_momentum=cfg.bn_momentum, dims=int(getattr(cfg, "dims", 2)))


def build_unet(cfg: ModelConfig) -> UNet:
    return UNet(**net_fields(cfg))


def count_params(params: Any) -> int:
    import jax

    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
