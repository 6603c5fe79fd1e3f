"""``Run.variable_shapes``: the abstract variables tree of the run's model, computed once."""

from __future__ import annotations

import jax


def test_variable_shapes_match_the_checkpoints_and_are_cached(tiny_run):
    from tracin_jax.run import load_run

    run = load_run(tiny_run)
    shapes = run.variable_shapes
    assert run.variable_shapes is shapes
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(shapes))
    real = run.checkpoints[-1].variables
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(real)
    same = jax.tree_util.tree_map(lambda s, x: (s.shape, s.dtype) == (x.shape, x.dtype),
                                  shapes, real)
    assert all(jax.tree_util.tree_leaves(same))
