"""The U-Net of :mod:`tracin_jax.models.unet` in PyTorch (NCHW), and a converter of Flax variables.

Used only by the benchmark's Captum baseline (PyTorch and Captum are the optional ``bench`` extra).

Architecture, as in the Flax model: encoder blocks of width ``width * 2**k`` (k < depth), a bridge
of ``width * 2**depth``; each block is twice [3x3 conv (padding 1, no bias) -> BatchNorm -> ReLU];
2x2 max-pool down; 2x2 stride-2 transposed conv up (with bias), concatenated *before* the skip
along channels (Flax: ``concatenate([x, skip], -1)``); a 1x1 conv head.

Two deliberate details:

- 3x3 convs use integer ``padding=1`` (identical to Flax ``SAME`` for odd kernels and stride 1),
  because Captum's per-sample-gradient hooks do not accept string paddings.
- The head is a bias-free ``nn.Conv2d`` named ``head`` plus a separate parameter ``head_bias``,
  so that Captum's ``layers=["head"]`` selects exactly the head kernel, which is what the
  ``head`` subset of tracin_jax differentiates (the authors' setting: bias excluded).

Weight layouts (:func:`load_flax_variables`):

- ``nn.Conv`` kernel ``[kh, kw, in, out]`` (HWIO) -> ``Conv2d.weight [out, in, kh, kw]`` (OIHW).
- ``nn.ConvTranspose`` kernel ``[kh, kw, in, out]`` with ``transpose_kernel=False`` (the Flax
  default): Flax dilates the input and *correlates* with the kernel as stored, while
  ``ConvTranspose2d`` is the adjoint of a correlation, i.e. it correlates the dilated input with
  the spatially *flipped* kernel. So ``weight[i, o, a, b] = kernel[kh-1-a, kw-1-b, i, o]``
  (layout ``[in, out, kh, kw]`` plus a spatial flip); :func:`check_equivalence` verifies it.
- BatchNorm: ``scale``/``bias`` -> ``weight``/``bias``; batch_stats ``mean``/``var`` ->
  ``running_mean``/``running_var``; epsilon 1e-3 as in the Flax model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

BN_EPS = 1e-3


class ConvBlock(nn.Module):
    def __init__(self, cin: int, features: int):
        super().__init__()
        self.conv0 = nn.Conv2d(cin, features, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(features, eps=BN_EPS, momentum=0.01)
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(features, eps=BN_EPS, momentum=0.01)

    def forward(self, x):
        x = torch.relu(self.norm0(self.conv0(x)))
        return torch.relu(self.norm1(self.conv1(x)))


class TorchUNet(nn.Module):
    """x f32[B, Cin, H, W] -> logits f32[B, num_classes, H, W] (BatchNorm norm only)."""

    def __init__(self, width: int = 64, depth: int = 4, in_channels: int = 4, num_classes: int = 4):
        super().__init__()
        self.depth = depth
        cin = in_channels
        for k in range(depth):
            setattr(self, f"enc{k}", ConvBlock(cin, width * 2**k))
            cin = width * 2**k
        self.bridge = ConvBlock(cin, width * 2**depth)
        cin = width * 2**depth
        for k in reversed(range(depth)):
            setattr(self, f"up{k}", nn.ConvTranspose2d(cin, width * 2**k, 2, stride=2))
            setattr(self, f"dec{k}", ConvBlock(2 * width * 2**k, width * 2**k))
            cin = width * 2**k
        self.head = nn.Conv2d(width, num_classes, 1, bias=False)
        self.head_bias = nn.Parameter(torch.zeros(num_classes))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        skips = []
        for k in range(self.depth):
            x = getattr(self, f"enc{k}")(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bridge(x)
        for k in reversed(range(self.depth)):
            x = getattr(self, f"up{k}")(x)
            x = torch.cat([x, skips[k]], dim=1)
            x = getattr(self, f"dec{k}")(x)
        return self.head(x) + self.head_bias[None, :, None, None]


def tumour_dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Same as :func:`tracin_jax.training.losses.tumour_dice_loss`, NCHW.

    logits f32[B, K, H, W], labels int[B, H, W] -> f32[B, 3] (classes 1..3).
    """
    p = torch.softmax(logits.float(), dim=1)
    y = nn.functional.one_hot(labels.long(), logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    inter = (y * p).sum(dim=(2, 3))
    denom = (y * y).sum(dim=(2, 3)) + (p * p).sum(dim=(2, 3)) + eps
    return (1.0 - 2.0 * inter / denom)[:, 1:]


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def flax_to_state_dict(variables: dict, depth: int) -> dict[str, torch.Tensor]:
    """Flax ``{'params', 'batch_stats'}`` of a BatchNorm UNet -> a TorchUNet state_dict."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    sd: dict[str, torch.Tensor] = {}

    def block(name: str):
        for i in range(2):
            sd[f"{name}.conv{i}.weight"] = _t(params[name][f"conv{i}"]["kernel"]).permute(3, 2, 0, 1)
            sd[f"{name}.norm{i}.weight"] = _t(params[name][f"norm{i}"]["scale"])
            sd[f"{name}.norm{i}.bias"] = _t(params[name][f"norm{i}"]["bias"])
            sd[f"{name}.norm{i}.running_mean"] = _t(stats[name][f"norm{i}"]["mean"])
            sd[f"{name}.norm{i}.running_var"] = _t(stats[name][f"norm{i}"]["var"])
            sd[f"{name}.norm{i}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    for k in range(depth):
        block(f"enc{k}")
        block(f"dec{k}")
        kernel = _t(params[f"up{k}"]["kernel"])  # [kh, kw, in, out]
        sd[f"up{k}.weight"] = kernel.flip(0, 1).permute(2, 3, 0, 1)  # [in, out, kh, kw], flipped
        sd[f"up{k}.bias"] = _t(params[f"up{k}"]["bias"])
    block("bridge")
    sd["head.weight"] = _t(params["head"]["kernel"]).permute(3, 2, 0, 1)
    sd["head_bias"] = _t(params["head"]["bias"])
    return {k: v.contiguous() for k, v in sd.items()}


def load_flax_variables(model: TorchUNet, variables: dict) -> TorchUNet:
    """Copies Flax variables into ``model`` (strict: every tensor must be matched)."""
    model.load_state_dict(flax_to_state_dict(variables, model.depth), strict=True)
    return model


def torch_head_grad_to_flax(g: torch.Tensor) -> torch.Tensor:
    """Head-kernel gradient [..., out, in, 1, 1] (OIHW) -> Flax order [..., 1, 1, in, out] flattened
    like ``subset.paths`` flattening of ``head/kernel`` (index ``f * K + k``)."""
    return g[..., 0, 0].transpose(-1, -2).reshape(*g.shape[:-4], -1)


def check_equivalence(flax_model: Any, variables: dict, image_hw: tuple[int, int] = (32, 32),
                      batch: int = 2, seed: int = 0) -> float:
    """Max |torch logits - flax logits| / max |flax logits| on random input, inference mode."""
    import jax
    import jax.numpy as jnp

    x = np.array(jax.random.normal(jax.random.key(seed), (batch, *image_hw, 4)), np.float32)
    ref = np.asarray(flax_model.apply(variables, jnp.asarray(x), train=False))
    tm = load_flax_variables(TorchUNet(flax_model.width, flax_model.depth, 4,
                                       flax_model.num_classes), variables).eval()
    with torch.no_grad():
        out = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))
