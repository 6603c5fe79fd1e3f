"""On-device augmentation: as in the paper for slices (resize up then random-crop back, random
horizontal flip); for volumes, random flips on each axis, random patches and intensity jitter
(also available to slices). Every function draws from the key it is given, so a step's
augmentation is fixed by its key (the trainer derives it from the seed, epoch and batch)."""

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


def random_flips(key, images, labels):
    """Flips each example along each spatial axis independently with probability 1/2.

    images: f32[B,*S,C], labels: int[B,*S] (S = (X, Y, Z) for volumes) -> same shapes.
    """
    spatial = labels.ndim - 1
    flips = jax.random.bernoulli(key, 0.5, (spatial, images.shape[0]))
    for axis in range(spatial):
        img_mask = flips[axis].reshape((-1,) + (1,) * (images.ndim - 1))
        lab_mask = flips[axis].reshape((-1,) + (1,) * (labels.ndim - 1))
        images = jnp.where(img_mask, jnp.flip(images, axis + 1), images)
        labels = jnp.where(lab_mask, jnp.flip(labels, axis + 1), labels)
    return images, labels


def random_intensity(key, images, amplitude: float):
    """Intensity jitter: per example and channel, x -> x * (1 + u) + v with u, v uniform in
    [-amplitude, amplitude]. images f32[B,*S,C] -> the same shape."""
    b, c = images.shape[0], images.shape[-1]
    ku, kv = jax.random.split(key)
    shape = (b,) + (1,) * (images.ndim - 2) + (c,)
    u = jax.random.uniform(ku, shape, images.dtype, -amplitude, amplitude)
    v = jax.random.uniform(kv, shape, images.dtype, -amplitude, amplitude)
    return images * (1.0 + u) + v


def random_patch(key, images, labels, patch):
    """One random patch of ``patch`` voxels per example, its corner uniform over the positions
    where it fits. images f32[B,*S,C], labels int[B,*S] -> f32[B,*patch,C], int[B,*patch]."""
    b, spatial, c = images.shape[0], images.shape[1:-1], images.shape[-1]
    patch = tuple(int(p) for p in patch)
    if patch == tuple(spatial):
        return images, labels
    keys = jax.random.split(key, len(spatial))
    corners = jnp.stack([jax.random.randint(k, (b,), 0, n - p + 1)
                         for k, n, p in zip(keys, spatial, patch)], axis=1)  # [B, len(S)]

    def cut(img, lab, corner):
        zero = jnp.zeros((), corner.dtype)
        img = jax.lax.dynamic_slice(img, (*corner, zero), (*patch, c))
        lab = jax.lax.dynamic_slice(lab, tuple(corner), patch)
        return img, lab

    return jax.vmap(cut)(images, labels, corners)
