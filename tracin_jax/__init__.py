"""tracin_jax: class-wise TracIn influence for brain-tumour segmentation, in JAX."""

__version__ = "0.1.0"


def load_run(workdir, data_dir=None):
    """Opens a trained run; see :class:`tracin_jax.run.Run`."""
    from tracin_jax.run import load_run as _load_run

    return _load_run(workdir, data_dir)


__all__ = ["load_run", "__version__"]
