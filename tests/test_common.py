"""Shared validation and tree helpers (``_common``): messages that name the option or leaf,
dtype rules, masks, and the sharding specs of factor groups."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_rlx import _common


@pytest.mark.parametrize("value, kwargs, match", [
    (None, {}, "must be a number, got None"),
    (lambda c: c, {}, "must be a number, not a callable"),
    (float("nan"), {}, "must be finite"),
    (math.inf, {}, "must be finite"),
    (-1.0, {"low": 0.0}, "must be >= 0.0"),
    (0.0, {"low": 0.0, "low_open": True}, "must be > 0.0"),
    (1.0, {"high": 1.0, "high_open": True}, "must be < 1.0"),
    (2.0, {"high": 1.0}, "must be <= 1.0"),
    ("0.1", {}, "must be a real scalar number"),
    (jnp.ones(2), {}, "must be a real scalar number"),
    (1j, {}, "must be a real scalar number"),
])
def test_check_number_names_the_option_and_the_broken_rule(value, kwargs, match):
  with pytest.raises(ValueError, match=f"opt: `lr` {match}"):
    _common.check_number("opt", "lr", value, **kwargs)


@pytest.mark.parametrize("value, kwargs", [
    (None, {"allow_none": True}), (lambda c: c, {"allow_schedule": True}),
    (math.inf, {"allow_inf": True}), (0.5, {"low": 0.0, "high": 1.0}), (jnp.float32(2.0), {}),
    (np.float64(3.0), {}), (7, {}),
])
def test_check_number_accepts_what_it_allows(value, kwargs):
  _common.check_number("opt", "lr", value, **kwargs)


def test_check_number_accepts_traced_values_it_cannot_see():
  jax.jit(lambda x: _common.check_number("opt", "lr", x, low=0.0) or x)(jnp.float32(-1.0))


def test_static_int_returns_a_python_int_or_names_the_option():
  assert _common.static_int("opt", "n", np.int64(3), low=1) == 3
  assert _common.static_int("opt", "n", jnp.int32(4), low=1) == 4
  for bad in (2.5, True, None, jnp.ones(2, jnp.int32)):
    with pytest.raises(ValueError, match="`n` must be an int"):
      _common.static_int("opt", "n", bad, low=1)
  with pytest.raises(ValueError, match="`n` must be >= 1"):
    _common.static_int("opt", "n", 0, low=1)
  with pytest.raises(ValueError, match="`n` decides the optimizer state's shapes"):
    jax.jit(lambda x: _common.static_int("opt", "n", x, low=1))(jnp.int32(3))


def test_tree_checks_name_the_leaf():
  ref = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros(4)}}
  with pytest.raises(ValueError, match=r"leaves missing from the updates: \['b'\]\['c'\]"):
    _common.check_same_structure("opt", ref, "the params", {"a": ref["a"], "b": {}}, "the updates")
  with pytest.raises(ValueError, match=r"unexpected leaves in the updates: \['z'\]"):
    _common.check_same_structure("opt", ref, "the params", {**ref, "z": ref["a"]}, "the updates")
  with pytest.raises(ValueError, match=r"leaf \['a'\] has shape \(3, 2\) in the updates but "
                                       r"\(2, 3\) in the params"):
    _common.check_same_shapes("opt", ref, "the params", {**ref, "a": jnp.zeros((3, 2))},
                              "the updates")
  with pytest.raises(ValueError, match=r"leaf \['i'\] of the params has dtype int32"):
    _common.check_inexact_leaves("opt", {"i": jnp.zeros(3, jnp.int32)}, "the params")
  with pytest.raises(ValueError, match=r"leaf \['s'\] of the params is str"):
    _common.check_inexact_leaves("opt", {"s": "x"}, "the params")
  assert _common.path_str(()) == "<root>"


@pytest.mark.parametrize("dtype, real, complex_, stats", [
    (jnp.float32, jnp.float32, jnp.complex64, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16, jnp.complex64, jnp.float32),
    (jnp.float16, jnp.float16, jnp.complex64, jnp.float32),
    (jnp.complex64, jnp.float32, jnp.complex64, jnp.complex64),
])
def test_dtype_rules(dtype, real, complex_, stats):
  assert _common.real_dtype(dtype) == real
  assert _common.complex_dtype(dtype) == complex_
  assert _common.stats_dtype(dtype) == stats
  assert _common.real_stats_dtype(dtype) == _common.real_dtype(stats)
  assert _common.like_param_dtype(jnp.bfloat16, dtype) == (
      jnp.complex64 if _common.is_complex(dtype) else jnp.bfloat16)


def test_abs2_is_real_and_exact():
  x = jnp.asarray([3 + 4j, -1j], jnp.complex64)
  np.testing.assert_array_equal(np.asarray(_common.abs2(x)), [25.0, 1.0])
  assert _common.abs2(x).dtype == jnp.float32


def test_masks_resolve_from_prefixes_and_callables():
  params = {"w": {"k": jnp.ones(2), "b": jnp.ones(2)}, "v": jnp.ones(3)}
  assert _common.resolve_mask({"w": True, "v": False}, params) == {
      "w": {"k": True, "b": True}, "v": False}
  assert _common.resolve_mask(lambda p: {"w": {"k": True, "b": False}, "v": True}, params) == {
      "w": {"k": True, "b": False}, "v": True}


@pytest.mark.parametrize("weight_decay", [0.0, 0, 1e-3])
def test_decoupled_weight_decay_keeps_one_state_structure(weight_decay):
  params = {"w": jnp.ones(3)}
  tx = _common.decoupled_weight_decay(weight_decay, None, "opt")
  reference = optax.add_decayed_weights(1e-3, None).init(params)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(reference)
  updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["w"]), weight_decay * np.ones(3))
  if weight_decay:
    with pytest.raises(ValueError, match=r"opt: weight_decay=0.001 needs the params"):
      tx.update({"w": jnp.zeros(3)}, tx.init(params))


def test_group_specs_shard_the_lead_axis_over_the_axes_that_divide():
  sizes = {"data": 2, "model": 4}
  assert _common.divisible_axes(8, ("data", "model"), sizes) == ("data", "model")
  assert _common.divisible_axes(6, ("data", "model"), sizes) == ("data",)
  assert _common.divisible_axes(4, ("model", "data"), sizes) == ("model",)
  assert _common.divisible_axes(3, ("data", "model"), sizes) == ()
  P = jax.sharding.PartitionSpec
  assert _common.lead_spec(("data", "model"), 3) == P(("data", "model"), None, None)
  assert _common.lead_spec(("data",), 2) == P("data", None) and _common.lead_spec((), 2) == P()
  mesh = jax.sharding.AbstractMesh((1, 1), ("data", "model"))
  assert _common.group_spec(4, 3, None, mesh) == P(("data", "model"), None, None)
  with pytest.raises(ValueError, match="`group_axes` names mesh axis 'pipe'"):
    _common.group_spec(4, 3, ("pipe",), mesh)


def test_specs_along_a_param_keep_its_entries_on_axes_of_equal_size():
  assert _common.padded_spec(jax.sharding.PartitionSpec("data"), 3) == ("data", None, None)
  assert _common.spec_along_param(("data", "model"), (1, 16), (64, 16)) == (None, "model")
  assert _common.spec_along_param(("data", "model"), (16,), (64, 16)) is None


def test_tuples_come_back_from_containers_that_rebuild_them_as_mappings():
  assert _common.as_tuple({1: "b", 0: "a"}) == ("a", "b")
  assert _common.as_tuple(["a", "b"]) == ("a", "b")


def test_momentum_follows_the_params_dtype_or_mu_dtype():
  params = {"w": jnp.ones(2, jnp.bfloat16), "c": jnp.ones(2, jnp.complex64)}
  mu = _common.momentum_like(params, None)
  assert mu["w"].dtype == jnp.bfloat16 and mu["c"].dtype == jnp.complex64
  mu = _common.momentum_like(params, jnp.float32)
  assert mu["w"].dtype == jnp.float32 and mu["c"].dtype == jnp.complex64
  assert _common.is_zero(0) and _common.is_zero(0.0) and not _common.is_zero(jnp.zeros(()))
