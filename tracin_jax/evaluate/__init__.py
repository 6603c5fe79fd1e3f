"""Evaluation of influence scores against retrained models (counterfactual ground truth).

- :mod:`tracin_jax.evaluate.retrain`: patient subsets and the test-split outputs of a model;
  the K models are trained by :mod:`tracin_jax.training.multi` (sequential or one vmapped
  train step over stacked models), whose names it re-exports.
- :mod:`tracin_jax.evaluate.ground_truth`: the cached, resumable ground truth of a run
  (``compute_ground_truth``) and leave-patients-out retraining (``retrain_without``).
- :mod:`tracin_jax.evaluate.lds`: class-wise LDS, bootstrap and paired intervals, noise ceiling.
- :mod:`tracin_jax.evaluate.leave_out`: leave-top-k-out queries, removal sets, loss changes.
- :mod:`tracin_jax.evaluate.sanity`: model randomisation, mislabel AUC.
- :mod:`tracin_jax.evaluate.report` and :mod:`tracin_jax.evaluate.api` (``run_evaluate``, the
  ``tracin-jax evaluate`` command): the table, json and figures.
"""
