"""ResUNet (Zhang, Liu and Wang 2018, "Road extraction by deep residual U-Net"), for 4 classes.

A U-Net whose blocks are *pre-activation* residual units (He et al. 2016): each unit is
[norm -> ReLU -> 3x3 conv] twice plus a shortcut (1x1 conv -> norm) added to it. The first unit
starts with its conv (the input is not activated); every later encoder unit and the bridge
halve the resolution with a stride-2 first conv and a stride-2 shortcut (no max-pool). Encoder
widths ``width * 2**k`` for k < depth, bridge ``width * 2**depth``. The decoder goes up by
nearest-neighbour 2x upsampling, concatenates the skip and applies a unit of stride 1. As in
pre-activation ResNets, the last unit's sum passes one more norm -> ReLU (``dec0/out_norm``)
before the 1x1 ``head``: that activated map is the last hidden feature map (``width`` channels,
full resolution, non-negative like the U-Net's). Zhang et al. had 3 levels at width 64 and a
sigmoid for one class; here depth, width and classes follow the config, and ``dims=3`` gives
the same network on volumes (3x3x3 convs, 1x1x1 shortcuts and head, 2x upsampling of the three
axes).

Trainable parameters, 4 input channels, 4 classes, depth 4, width 64 (``jax.eval_shape``, no
init): 33,137,412.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from tracin_jax.models.deepseg import upsample2
from tracin_jax.models.unet import SegmentationNet, _norm, cube, head, net_fields


class ResBlock(nn.Module):
    """Pre-activation residual unit. x: f32[B,*S,Cin] -> f32[B,*S/s,features] (S: ``dims``
    spatial sizes).

    ``first``: no norm/ReLU before the first conv (the network's input); ``stride``: 1 or 2;
    ``out_norm``: a final norm -> ReLU on the sum (the network's last unit).
    """

    features: int
    stride: int = 1
    first: bool = False
    out_norm: bool = False
    norm: str = "batch"
    bn_momentum: float = 0.99
    dims: int = 2

    def _act(self, x, train, name):
        norm = _norm(self.norm, x.shape[-1], train, name, self.bn_momentum)
        return nn.relu(norm(x) if norm is not None else x)

    @nn.compact
    def __call__(self, x, train: bool):
        bias = self.norm == "none"
        s, three = cube(self.stride, self.dims), cube(3, self.dims)
        h = x if self.first else self._act(x, train, "norm0")
        h = nn.Conv(self.features, three, strides=s, padding="SAME", use_bias=bias,
                    name="conv0")(h)
        h = self._act(h, train, "norm1")
        h = nn.Conv(self.features, three, padding="SAME", use_bias=True, name="conv1")(h)
        skip = nn.Conv(self.features, cube(1, self.dims), strides=s, use_bias=bias,
                       name="skip_conv")(x)
        norm = _norm(self.norm, self.features, train, "skip_norm", self.bn_momentum)
        y = h + (norm(skip) if norm is not None else skip)
        return self._act(y, train, "out_norm") if self.out_norm else y


class ResUNet(SegmentationNet):
    """x: f32[B,*S,Cin] -> logits f32[B,*S,num_classes] (and features f32[B,*S,width])."""

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        kw = dict(norm=self.norm, bn_momentum=self.bn_momentum, dims=self.dims)
        skips = []
        for k in range(self.depth):
            x = ResBlock(self.width * 2**k, stride=1 if k == 0 else 2, first=k == 0, name=f"enc{k}",
                         **kw)(x, train)
            skips.append(x)
        x = ResBlock(self.width * 2**self.depth, stride=2, name="bridge", **kw)(x, train)
        for k in reversed(range(self.depth)):
            x = jnp.concatenate([upsample2(x), skips[k]], axis=-1)
            x = ResBlock(self.width * 2**k, out_norm=k == 0, name=f"dec{k}", **kw)(x, train)
        return head(self, x, return_features)


def build_resunet(cfg) -> ResUNet:
    return ResUNet(**net_fields(cfg))
