"""Counterfactual evaluation of influence scores: retraining on patient subsets, class-wise LDS,
leave-top-k-out, sanity checks (see :mod:`tracin_jax.evaluate.api`)."""
