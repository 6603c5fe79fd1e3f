"""Evaluation of influence scores against retrained models (counterfactual ground truth).

- :mod:`tracin_jax.evaluate.retrain`: patient subsets, retraining K models (sequential or one
  vmapped train step over stacked models), the test-split outputs of a model.
- :mod:`tracin_jax.evaluate.ground_truth`: the cached, resumable ground truth of a run
  (``compute_ground_truth``) and leave-patients-out retraining (``retrain_without``).
"""
