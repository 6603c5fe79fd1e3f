"""DeepSeg (Zeineldin et al. 2020, IJCARS 15:909) adapted to 4-channel slices and 4 classes.

The encoder-decoder of that paper's ``UNet-Mod`` configuration: encoder widths
``width * 2**k`` for k < depth, bottleneck ``width * 2**depth``, each block twice
[3x3 conv (same) -> norm -> ReLU] and a 2x2 max-pool; the decoder goes up by nearest-neighbour
2x upsampling followed by a 2x2 conv (same padding, bias) and ReLU -- not a transposed conv as in
the U-Net of :mod:`.unet` -- then concatenates the skip (skip first) and applies a block as in
the encoder. DeepSeg used one FLAIR channel at 224x224, width 32 and 2 classes; here the input
is the project's 4 modalities at 192x192 (any size divisible by ``2**depth``) and the output 4
classes; ``dims=3`` gives the same network on volumes (3x3x3 convs, 2x2x2 pooling and
upsampling, a 2x2x2 conv after upsampling, a 1x1x1 head). Two more departures, both for the
class-wise analysis: the output layer is a 1x1 conv ``head`` to ``num_classes`` logits
(DeepSeg's is a 3x3 conv -> BatchNorm -> ReLU before the softmax, which has no linear readout of
a hidden feature map), and the bottleneck has no dropout (DeepSeg: 0.5), so a training step is
a deterministic function of its batch. Convolutions followed by BatchNorm carry no bias (it
would be cancelled by the norm's shift).

Trainable parameters, 4 input channels, 4 classes, depth 4 (``jax.eval_shape``, no init):
width 64 (the project's paper width): 31,038,404, as many as the U-Net (a 2x2 conv after
upsampling has the weights of a 2x2 transposed conv); width 32 (DeepSeg's): 7,763,428.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from tracin_jax.models.unet import ConvBlock, SegmentationNet, cube, encoder, head, net_fields


def upsample2(x):
    """Nearest-neighbour 2x upsampling of every spatial axis: f32[B,*S,C] -> f32[B,*2S,C]
    (f32[B,H,W,C] -> f32[B,2H,2W,C]; f32[B,D,H,W,C] -> f32[B,2D,2H,2W,C])."""
    for axis in range(1, x.ndim - 1):
        x = jnp.repeat(x, 2, axis=axis)
    return x


class DeepSeg(SegmentationNet):
    """x: f32[B,*S,Cin] -> logits f32[B,*S,num_classes] (and features f32[B,*S,width])."""

    width: int = 32  # DeepSeg's own width

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x, skips = encoder(self, x, train)
        for k in reversed(range(self.depth)):
            x = nn.relu(nn.Conv(self.width * 2**k, cube(2, self.dims), padding="SAME",
                                name=f"up{k}")(upsample2(x)))
            x = jnp.concatenate([skips[k], x], axis=-1)
            x = ConvBlock(self.width * 2**k, self.norm, self.bn_momentum, self.dims,
                          name=f"dec{k}")(x, train)
        return head(self, x, return_features)


def build_deepseg(cfg) -> DeepSeg:
    return DeepSeg(**net_fields(cfg))
