"""Kron's state (``_kron_state``): factor groups named by what they hold, a layout derived from
the params and the options (never stored), restores by name, checks that name group and option,
and the per-leaf view."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_rlx
from optax_rlx import _kron_options, _kron_state

ocp = pytest.importorskip("orbax.checkpoint")


def _params(rng):
  shapes = {"a": (6, 4), "b": (6, 4), "c": (4, 6), "v": (4,), "u": (4,), "s": (),
            "stack": (3, 6, 4), "blk": (12, 4)}
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


STRUCTURE = {"stacked_layers": {"a": False, "b": False, "c": False, "v": False, "u": False,
                                "s": False, "stack": True, "blk": False}, "block_size": 6}


def _loss(params):
  return sum(jnp.sum(jnp.sin(3.0 * x) + 0.5 * x**2) for x in jax.tree.leaves(params))


def _steps(tx, params, state, n):
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p))
  for _ in range(n):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params, state


def _state_paths(state):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def test_state_paths_name_each_group_by_its_factor_shapes_and_dtype(rng):
  params = _params(rng)
  state = jax.eval_shape(optax_rlx.kron(1e-3, **STRUCTURE).init, params)[0]
  # a, b, the 3 layers of stack and blk's 2 blocks (6, 4): one group of 7 units; c (4, 6) its
  # own; v, u one group of 2; s; the skew rule makes nothing diagonal here (6² <= 2 · 24).
  assert {name: [x.shape for x in arrays] for name, arrays in state.Qs.items()} == {
      "6x6_4x4_float32": [(7, 6, 6), (7, 4, 4)],
      "4x4_6x6_float32": [(1, 4, 4), (1, 6, 6)],
      "4_float32": [(2, 4)],
      "1_float32": [(1, 1)],
  }
  assert {name: [x.shape for x in arrays] for name, arrays in state.Ls.items()} == {
      "6x6_4x4_float32": [(7,), (7,)], "4x4_6x6_float32": [(1,), (1,)], "4_float32": [(2,)],
      "1_float32": [(1,)]}
  paths = _state_paths(state)
  assert ".Qs['6x6_4x4_float32'][1]" in paths and ".Ls['4_float32'][0]" in paths


@pytest.mark.parametrize("dtype, options, name", [
    (jnp.float32, {"precond_dtype": "bfloat16"}, "8x8_5x5_bfloat16_float32"),
    (jnp.complex64, {}, "8x8_5x5_complex64"),
    (jnp.bfloat16, {}, "8x8_5x5_float32"),
    (jnp.float32, {"memory_save_mode": "all_diag"}, "8_5_float32"),
    (jnp.complex64, {"memory_save_mode": "all_diag"}, "8_5_float32_complex64"),
])
def test_group_names_say_the_storage_and_compute_dtypes(dtype, options, name):
  state = optax_rlx.scale_by_kron(**options).init(jnp.zeros((8, 5), dtype))
  (got,) = state.Qs
  assert got == name
  assert state.Qs[name][0].dtype == jnp.dtype(name.split("_")[2])


def test_the_layout_lives_in_no_treedef_and_group_axes_leave_the_state_alone(rng):
  params = _params(rng)
  plain = jax.eval_shape(optax_rlx.kron(1e-3, **STRUCTURE).init, params)
  by_model = jax.eval_shape(optax_rlx.kron(1e-3, group_axes="model", **STRUCTURE).init, params)
  assert jax.tree.structure(by_model) == jax.tree.structure(plain)
  # Plain containers: dicts of tuples of arrays, no aux data beyond the dicts' keys.
  kron_state = plain[0]
  for field in (kron_state.Qs, kron_state.Ls):
    assert type(field) is dict and all(type(x) is tuple for x in field.values())


def test_by_leaf_gives_the_per_leaf_factor_shapes(rng):
  params = _params(rng)
  state = optax_rlx.scale_by_kron(key=0, **STRUCTURE).init(params)
  qs = optax_rlx.kron_by_leaf(state.Qs, params, **STRUCTURE)
  ls = optax_rlx.kron_by_leaf(state.Ls, params, **STRUCTURE)
  assert [q.shape for q in qs["a"]] == [(6, 6), (4, 4)]
  assert [q.shape for q in qs["stack"]] == [(3, 6, 6), (3, 4, 4)]
  assert [q.shape for q in qs["blk"]] == [(2, 6, 6), (2, 4, 4)]
  assert [q.shape for q in qs["v"]] == [(4,)] and [q.shape for q in qs["s"]] == [(1,)]
  assert [x.shape for x in ls["stack"]] == [(3,), (3,)] and ls["a"][0].shape == ()
  abstract = jax.eval_shape(lambda: state).Qs
  assert jax.tree.map(lambda x: x.shape, optax_rlx.kron_by_leaf(abstract, params, **STRUCTURE)
                      ) == jax.tree.map(lambda x: x.shape, qs)
  # Units sit in leaf order (a, b, blk, stack: sorted keys), a leaf's layers and blocks together.
  group = state.Qs["6x6_4x4_float32"][0]
  layout = _kron_state.tree_layout(params, _kron_options.make_config(STRUCTURE))
  names = sorted(params)
  slots = {k: layout.slots[names.index(k)] for k in ("a", "b", "blk", "stack")}
  assert [(s.start, s.count) for s in slots.values()] == [(0, 1), (1, 1), (2, 2), (4, 3)]
  assert group.shape[0] == 7


def _save_and_restore(tmp_path, state, target):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "state", state)
    ckptr.wait_until_finished()
    return ckptr.restore(tmp_path / "state", target)


def test_a_checkpoint_restores_by_name_when_leaves_are_reordered(rng, tmp_path):
  """A list of params [w (6, 4), c (4, 6), b (3,)] saved, then restored for the list in another
  order: each group comes back under its name, so every param keeps its own factors. (Without
  momentum: a momentum is shaped like the params, so it follows their own tree, as Adam's.)"""
  w, c, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((6, 4), (4, 6), (3,)))
  tx = optax_rlx.kron(1e-2, key=0, b1=None)

  def loss(params):
    return sum(jnp.sum(jnp.sin(2.0 * x) ** 2) for x in params)

  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params = [w, c, b]
  state = tx.init(params)
  for _ in range(5):
    params, state = step(params, state)
  reordered = [params[2], params[1], params[0]]
  target = jax.eval_shape(tx.init, reordered)
  restored = _save_and_restore(tmp_path, state, target)
  assert jax.tree.structure(restored) == jax.tree.structure(target)
  for name, arrays in state[0].Qs.items():  # by name, not by position
    for x, y in zip(arrays, restored[0].Qs[name], strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ahead, _ = step(params, state)
  ahead_reordered, _ = step(reordered, restored)
  for x, y in zip(ahead, ahead_reordered[::-1], strict=True):
    # Equal up to the damping noise (1e-9 of the target), drawn in the leaves' order.
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_a_checkpoint_restores_under_other_group_axes(rng, tmp_path):
  params = _params(rng)
  plain = optax_rlx.kron(1e-2, key=0, **STRUCTURE)
  _, state = _steps(plain, params, plain.init(params), 3)
  target = jax.eval_shape(optax_rlx.kron(1e-2, key=0, group_axes="data", **STRUCTURE).init,
                          params)
  restored = _save_and_restore(tmp_path, state, target)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_state_for_other_params_or_options_raises_naming_the_group_and_option(rng):
  params = {"w": jnp.ones((6, 4)), "v": jnp.ones(4)}
  state = optax_rlx.scale_by_kron(key=0).init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError,
                     match=r"'4_float32'.*\(\(1, 4\),\).*\(\(2, 4\),\).*group_multiple"):
    optax_rlx.scale_by_kron(key=0, group_multiple=2).update(grads, state)
  with pytest.raises(ValueError, match=r"\['w'\].*\(6, 4\).*'6_4x4_float32'.*max_skew_dense"):
    optax_rlx.scale_by_kron(key=0, max_skew_dense=1.0).update(grads, state)
  with pytest.raises(ValueError, match=r"precond_dtype"):
    optax_rlx.scale_by_kron(key=0, precond_dtype="bfloat16").update(grads, state)
  bigger = optax_rlx.scale_by_kron(key=0).init({**params, "s": jnp.ones(())})
  with pytest.raises(ValueError, match=r"\['1_float32'\] that these updates do not have"):
    optax_rlx.scale_by_kron(key=0, b1=None).update(grads, bigger._replace(mu=()))
  per_leaf = optax_rlx.kron_by_leaf(state.Qs, params)
  with pytest.raises(ValueError, match=r"`Qs` is a list, not the dict of factor groups"):
    optax_rlx.scale_by_kron(key=0).update(grads, state._replace(Qs=list(per_leaf.values())))
  with pytest.raises(ValueError, match=r"\['w'\].*\(6, 5\)"):
    optax_rlx.scale_by_kron(key=0, b1=None).update({"w": jnp.ones((6, 5)), "v": jnp.ones(4)},
                                                  state._replace(mu=()))


def test_a_params_tree_with_no_leaves_has_no_groups():
  state = optax_rlx.scale_by_kron(cache_precond=True).init({})
  for field in (state.Qs, state.Ls, state.Ps):
    assert field.shape == (0,) and field.dtype == jnp.float32
  updates, new_state = optax_rlx.scale_by_kron(cache_precond=True).update({}, state)
  assert updates == {} and int(new_state.count) == 1
  # optax.tree.map_params inits on a leafless placeholder: the factors are not params there.
  tx = optax_rlx.kron(1e-2)
  params = {"w": jnp.ones((3, 2))}
  full = tx.init(params)
  specs = optax.tree.map_params(tx, lambda _, spec: spec, full, {"w": "spec"},
                                transform_non_params=lambda _: None)
  assert specs[0].mu == {"w": "spec"} and specs[0].Qs is None and specs[0].count is None


@pytest.mark.parametrize("made_with, used_with, match", [
    ({}, {"block_size": 8}, r"leaf \['v'\] .*'8_float32'.*block_size"),
    ({}, {"stacked_layers": {"w": True, "v": False}}, r"leaf \['w'\] .*stacked_layers"),
    ({}, {"precond_dtype": "bfloat16"}, r"\['v'\]'s factors are in the state as \['16_float32'\], "
                                        r"not as '16_bfloat16_float32'.*precond_dtype"),
    ({}, {"geometry": "triangular"}, r"\['w'\]'s factors .*'16x16_8x8_float32_triangular'.*"
                                     r"`geometry`"),
    ({"geometry": "triangular"}, {}, r"\['w'\]'s factors .*\['16x16_8x8_float32_triangular'\].*"
                                     r"`geometry`"),
    ({"b1": None}, {}, r"the state has no momentum, but this transform has b1=0.9"),
    ({}, {"b1": None}, r"the state has a momentum, but this transform has b1=None"),
    ({}, {"cache_precond": True}, r"cache_precond=True"),
])
def test_a_state_made_with_other_options_names_the_option(made_with, used_with, match):
  """Each message names the leaf or group and the option (issue 27, item 9: a procrustes state
  was taken silently by a triangular kron and the reverse; a ``b1=None`` state gave a raw pytree
  error; ``precond_dtype`` read 'sizes [1,1,1,1] do not match sizes [1,1,1,1]')."""
  params = {"w": jnp.ones((16, 8)), "v": jnp.ones(16)}
  state = optax_rlx.scale_by_kron(**made_with).init(params)
  with pytest.raises(ValueError, match=match):
    optax_rlx.scale_by_kron(**used_with).update(params, state)
