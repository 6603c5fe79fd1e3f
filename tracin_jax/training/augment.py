"""On-device augmentation as in the paper: resize up then random-crop back, random horizontal flip."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_flip(key, images, labels):
    """Flips each example left-right with probability 1/2.

    images: f32[B,H,W,C], labels: int[B,H,W] -> same shapes.
    """
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    labels = jnp.where(flip[:, None, None], labels[:, :, ::-1], labels)
    return images, labels


def random_resize_crop(key, images, labels, size: int):
    """Resizes to size x size (bilinear images, nearest labels), then crops a random H x W window.

    The crop offset is drawn per batch element. images: f32[B,H,W,C], labels: int[B,H,W].
    """
    b, h, w, c = images.shape
    if size <= max(h, w):
        return images, labels
    big = jax.image.resize(images, (b, size, size, c), "bilinear")
    big_lab = jax.image.resize(labels.astype(jnp.float32), (b, size, size), "nearest").astype(labels.dtype)
    ky, kx = jax.random.split(key)
    oy = jax.random.randint(ky, (b,), 0, size - h + 1)
    ox = jax.random.randint(kx, (b,), 0, size - w + 1)

    def crop(img, lab, y, x):
        img = jax.lax.dynamic_slice(img, (y, x, 0), (h, w, c))
        lab = jax.lax.dynamic_slice(lab, (y, x), (h, w))
        return img, lab

    return jax.vmap(crop)(big, big_lab, oy, ox)
