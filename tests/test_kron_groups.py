"""Kron's factor groups: every fitting unit with the same factor layout is stored and fitted in
one batch (``FactorGroups``), padded with ``group_multiple``; the per-leaf view; layout checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_rlx
from optax_rlx import _kron_plan as planning


def _params(rng):
  shapes = {"a": (6, 4), "b": (6, 4), "c": (4, 6), "v": (4,), "u": (4,), "s": (),
            "stack": (3, 6, 4), "blk": (12, 4)}
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _loss(params):
  return sum(jnp.sum(jnp.sin(3.0 * x) + 0.5 * x**2) for x in jax.tree.leaves(params))


def _run(tx, params, steps=6):
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p, obj_fn=_loss))
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params, state


def test_units_with_the_same_layout_share_one_group(rng):
  params = _params(rng)
  stacked = {k: k == "stack" for k in params}
  tx = optax_rlx.scale_by_kron(key=0, stacked_layers=stacked, block_size=6)
  layout = tx.init(params).Qs.layout
  names = sorted(params)
  group = {k: layout.slots[names.index(k)].group for k in names}
  # a, b (6, 4), the 3 layers of stack (6, 4) and blk's two (6, 4) blocks: one group of 7 units.
  assert group["a"] == group["b"] == group["stack"] == group["blk"]
  assert layout.groups[group["a"]].units == layout.groups[group["a"]].size == 7
  assert group["c"] != group["a"]  # (4, 6): other factor shapes
  assert group["u"] == group["v"] != group["s"]
  slots = {k: layout.slots[names.index(k)] for k in ("a", "b", "blk", "stack")}
  # Units in leaf order (sorted keys: a, b, blk, ...), a leaf's layers/blocks consecutive.
  assert [(s.start, s.count) for s in slots.values()] == [(0, 1), (1, 1), (2, 2), (4, 3)]
  assert len(layout.groups) == 4  # instead of one fitting call per leaf (8)


def test_by_leaf_gives_the_per_leaf_factor_shapes(rng):
  params = _params(rng)
  stacked = {k: k == "stack" for k in params}
  state = optax_rlx.scale_by_kron(key=0, stacked_layers=stacked, block_size=6).init(params)
  qs, ls = state.Qs.by_leaf(), state.Ls.by_leaf()
  assert [q.shape for q in qs["a"]] == [(6, 6), (4, 4)]
  assert [q.shape for q in qs["stack"]] == [(3, 6, 6), (3, 4, 4)]
  assert [q.shape for q in qs["blk"]] == [(2, 6, 6), (2, 4, 4)]
  assert [q.shape for q in qs["v"]] == [(4,)] and [q.shape for q in qs["s"]] == [(1,)]
  assert [x.shape for x in ls["stack"]] == [(3,), (3,)] and ls["a"][0].shape == ()
  abstract = jax.eval_shape(lambda: state).Qs.by_leaf()
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, qs)


def test_grouped_fitting_equals_one_optimizer_per_leaf(rng):
  """Leaves fitted in one group move as each does alone: the same math per unit. (Procrustes
  whitening, where the probe is integrated out: only the damping noise, of relative size 1e-9,
  differs with the key split. Triangular geometry and Newton draw their probes per leaf, so
  there the split changes the draws; the padding test below covers them.)"""
  params = {k: v for k, v in _params(rng).items() if k in ("a", "b", "v", "u")}
  options = dict(key=0, precond_update_prob=1.0)
  together, state = _run(optax_rlx.kron(1e-2, **options), params)
  assert len(state[0].Qs.layout.groups) == 2  # {a, b} and {v, u}
  for name in params:
    alone, _ = _run(optax_rlx.kron(1e-2, **options), {name: params[name]})
    np.testing.assert_allclose(together[name], alone[name], rtol=1e-5, atol=1e-6, err_msg=name)


# Each geometry and each criterion once (not the full product: compile time).
@pytest.mark.parametrize("geometry, criterion", [("procrustes", "newton"),
                                                 ("triangular", "whitening")])
def test_group_multiple_pads_groups_and_leaves_the_updates_unchanged(rng, geometry, criterion):
  params = _params(rng)
  options = dict(key=0, stacked_layers={k: k == "stack" for k in params}, block_size=6,
                 geometry=geometry, criterion=criterion)
  plain = optax_rlx.kron(1e-2, **options)
  padded = optax_rlx.kron(1e-2, group_multiple=4, **options)
  p_plain, s_plain = _run(plain, params)
  p_padded, s_padded = _run(padded, params)
  groups = s_padded[0].Qs.layout.groups
  assert all(g.size % 4 == 0 and g.size - g.units < 4 for g in groups)
  assert [g.units for g in groups] == [g.units for g in s_plain[0].Qs.layout.groups]
  for name in params:
    np.testing.assert_allclose(p_padded[name], p_plain[name], rtol=1e-6, atol=1e-7)
  for q in jax.tree.leaves(s_padded[0].Qs):  # padding units too
    assert np.all(np.isfinite(np.asarray(q)))
  per_leaf = jax.tree.map(np.asarray, s_padded[0].Qs.by_leaf())
  assert jax.tree.map(np.shape, per_leaf) == jax.tree.map(np.shape, s_plain[0].Qs.by_leaf())


def test_a_state_with_another_layout_raises_naming_the_leaf_or_option(rng):
  params = {"w": jnp.ones((6, 4)), "v": jnp.ones(4)}
  state = optax_rlx.scale_by_kron(key=0).init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match="group_multiple"):
    optax_rlx.scale_by_kron(key=0, group_multiple=2).update(grads, state)
  with pytest.raises(ValueError, match=r"\['w'\].*\(6, 4\)"):
    optax_rlx.scale_by_kron(key=0, max_skew_dense=1.0).update(grads, state)
  with pytest.raises(ValueError, match="FactorGroups"):
    optax_rlx.scale_by_kron(key=0).update(grads, state._replace(Qs=state.Qs.by_leaf()))


def test_group_units_orders_groups_by_first_leaf_and_pads():
  rule = planning.StructureRule(max_size_dense=8192, min_ndim_dense=2, max_skew_dense=2.0,
                                memory_save_mode=None, block_size=None)
  plans = [planning.make_plan(s, False, rule, str(i))
           for i, s in enumerate([(3, 2), (5,), (3, 2), (5,), (3, 2)])]
  groups, slots = planning.group_units(plans, [("f32",)] * 5, multiple=4)
  assert [(g.block_shape, g.units, g.size) for g in groups] == [((3, 2), 3, 4), ((5,), 2, 4)]
  assert [(s.group, s.start) for s in slots] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]
  mixed, _ = planning.group_units(plans[:2] + plans[2:3], [("f32",), ("f32",), ("f64",)], 1)
  assert len(mixed) == 3  # another dtype key: another group


def test_units_round_trip_through_to_units_and_from_units(rng):
  rule = planning.StructureRule(max_size_dense=8192, min_ndim_dense=2, max_skew_dense=2.0,
                                memory_save_mode=None, block_size=4)
  for shape, stacked in [((8, 6), False), ((3, 8, 4), True), ((5,), False), ((), False)]:
    plan = planning.make_plan(shape, stacked, rule, "x")
    x = rng.standard_normal(shape)
    units = planning.to_units(x, plan)
    assert units.shape[1:] == plan.block_shape
    np.testing.assert_array_equal(planning.from_units(units, plan), x)


def test_asymmetry_rotation_stays_conditional_in_grouped_refits():
  """Low-rank procrustes steps (a (64, 8) leaf's 64-axis) remove residual asymmetry with a full
  rotation only when needed. Under the group's vmap a per-factor ``lax.cond`` would become a
  select that rotates every factor at every refit (2n³ flops: 1.85x the whole update of
  kron_speed.py's model); the check must stay a real ``cond`` for the group. The low-rank step
  is this test's subject and needs ``max_skew_dense > 2``: at the default 2.0 a dense axis has
  n² <= 2 numel, so it never takes that step (kron_speed.py's all-dense structure does)."""
  params = {"a": jnp.ones((64, 8)), "b": jnp.ones((64, 8))}
  tx = optax_rlx.scale_by_kron(max_skew_dense=float("inf"), precond_update_prob=1.0)
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
  assert "cond[" in str(jaxpr)
