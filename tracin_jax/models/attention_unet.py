"""Attention U-Net (Oktay et al. 2018, "Attention U-Net: learning where to look for the
pancreas"), 2D or 3D (``dims``), for 4 classes.

The U-Net of :mod:`.unet` (same encoder, bridge, 2x2 stride-2 transposed-conv upsampling and
blocks) with an additive attention gate on every skip connection. The gate of level k takes the
skip x (``C`` channels) and the gating signal g, the coarser decoder map before upsampling
(as in the paper's grid-attention gate); with ``C/2`` intermediate channels:

    q     = ReLU(theta(x) + phi(g))         theta: 2x2 conv, stride 2, no bias; phi: 1x1 conv
    alpha = sigmoid(psi(q))                 psi: 1x1 conv to 1 channel, f32[B,H/2,W/2,1]
    out   = norm(W(upsample(alpha) * x))    bilinear 2x upsampling; W: 1x1 conv

(with ``dims=3``: 2x2x2 and 1x1x1 convs, trilinear upsampling, 3x3x3 block convs)
and the gated skip is concatenated with the upsampled map. The gate lives in the decoder block
of its level (``dec{k}/gate/...``), so the ``decoder`` parameter subset includes it. Deep
supervision (the paper's auxiliary outputs) is left out: one 1x1 ``head`` reads the last block
(``width`` channels, full resolution).

Trainable parameters, 4 input channels, 4 classes, depth 4, width 64 (``jax.eval_shape``, no
init): 32,433,928.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tracin_jax.models.unet import SegmentationNet, _norm, cube, encoder, head, net_fields


class AttentionGate(nn.Module):
    """x f32[B,*S,C] (skip), g f32[B,*S/2,Cg] (gating) -> gated skip f32[B,*S,C] (S: ``dims``
    spatial sizes)."""

    norm: str = "batch"
    bn_momentum: float = 0.99
    dims: int = 2

    @nn.compact
    def __call__(self, x, g, train: bool):
        c = x.shape[-1]
        inter = max(1, c // 2)
        one, two = cube(1, self.dims), cube(2, self.dims)
        q = nn.relu(nn.Conv(inter, two, strides=two, use_bias=False, name="theta")(x)
                    + nn.Conv(inter, one, name="phi")(g))
        alpha = nn.sigmoid(nn.Conv(1, one, name="psi")(q))
        # "bilinear" is jax.image's "linear": bilinear in 2D, trilinear in 3D.
        alpha = jax.image.resize(alpha, x.shape[:-1] + (1,), method="bilinear")
        y = nn.Conv(c, one, use_bias=self.norm == "none", name="out")(alpha * x)
        norm = _norm(self.norm, c, train, "out_norm", self.bn_momentum)
        return norm(y) if norm is not None else y


class AttentionDecoderBlock(nn.Module):
    """Gate the skip with g, concatenate with the upsampled map, then a U-Net block.

    up f32[B,*S,C'], skip f32[B,*S,C], g f32[B,*S/2,Cg] -> f32[B,*S,features].
    """

    features: int
    norm: str = "batch"
    bn_momentum: float = 0.99
    dims: int = 2

    @nn.compact
    def __call__(self, up, skip, g, train: bool):
        gated = AttentionGate(self.norm, self.bn_momentum, self.dims, name="gate")(skip, g, train)
        x = jnp.concatenate([up, gated], axis=-1)
        for i in range(2):
            x = nn.Conv(self.features, cube(3, self.dims), padding="SAME",
                        use_bias=self.norm == "none", name=f"conv{i}")(x)
            norm = _norm(self.norm, self.features, train, f"norm{i}", self.bn_momentum)
            x = nn.relu(norm(x) if norm is not None else x)
        return x


class AttentionUNet(SegmentationNet):
    """x: f32[B,*S,Cin] -> logits f32[B,*S,num_classes] (and features f32[B,*S,width])."""

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x, skips = encoder(self, x, train)
        two = cube(2, self.dims)
        for k in reversed(range(self.depth)):
            up = nn.ConvTranspose(self.width * 2**k, two, strides=two, name=f"up{k}")(x)
            x = AttentionDecoderBlock(self.width * 2**k, self.norm, self.bn_momentum, self.dims,
                                      name=f"dec{k}")(up, skips[k], x, train)
        return head(self, x, return_features)


def build_attention_unet(cfg) -> AttentionUNet:
    return AttentionUNet(**net_fields(cfg))
