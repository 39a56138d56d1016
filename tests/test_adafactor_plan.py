"""Adafactor's static plan (``_adafactor_plan``): which two axes of each leaf are factored, by
named policy, callable rule or per-leaf tree, and the messages for bad rules."""

import jax.numpy as jnp
import pytest

import optax_rlx
from optax_rlx import _adafactor_plan as plan


@pytest.mark.parametrize("policy, shape, axes", [
    ("largest_two", (3, 200, 150), (2, 1)),
    ("largest_two", (300, 2, 140), (2, 0)),
    ("last_two", (300, 2, 140), (1, 2)),
    ("none", (300, 400), None),
    ("largest_two", (7,), None),
    (lambda path, shape: (0, -1), (130, 5, 140), (0, 2)),
])
def test_policy_axes(policy, shape, axes):
  assert plan.policy_axes(policy, "['w']", shape) == axes


def test_the_minimum_size_gates_named_policies_at_init_only():
  assert plan.factored_axes("last_two", "['w']", (300, 2, 140), 128, for_init=True) is None
  assert plan.factored_axes("last_two", "['w']", (300, 2, 140), 128, for_init=False) == (1, 2)
  rule = lambda path, shape: (1, 2)  # noqa: E731  (a callable rule is taken as it is)
  assert plan.factored_axes(rule, "['w']", (300, 2, 140), 128, for_init=True) == (1, 2)
  assert plan.reduced((3, 4, 5), 1) == (3, 1, 5)


@pytest.mark.parametrize("axes", [(0, 0), (0, 3), (0,), "01", (0.0, 1)])
def test_a_bad_rule_result_names_the_leaf_and_shape(axes):
  with pytest.raises(ValueError, match=r"returned .* for leaf \['w'\] of shape \(4, 5, 6\)"):
    plan.policy_axes(lambda path, shape: axes, "['w']", (4, 5, 6))


def test_unknown_policies_are_rejected():
  with pytest.raises(ValueError, match="unknown `factoring` policy 'first_two'"):
    plan.check_policy("first_two")
  with pytest.raises(ValueError, match="must be a policy name"):
    plan.check_policy(3)


@pytest.mark.parametrize(
    "factoring, shape, expected_row, expected_col",
    [
        ("largest_two", (3, 200, 150), (3, 1, 150), (3, 200, 1)),
        ("largest_two", (300, 2, 140), (1, 2, 140), (300, 2, 1)),
        ("last_two", (300, 2, 140), None, None),  # 2 < 128: not factored
        ("last_two", (7, 130, 140), (7, 130, 1), (7, 1, 140)),
        (lambda path, shape: (0, 2), (130, 5, 140), (130, 5, 1), (1, 5, 140)),
        (lambda path, shape: None, (130, 140), None, None),
        ("none", (300, 400), None, None),
    ],
)
def test_factoring_policies_pick_axes(factoring, shape, expected_row, expected_col):
  state = optax_rlx.scale_by_adafactor(factoring=factoring).init(jnp.zeros(shape))
  if expected_row is None:
    assert state.v.shape == shape and state.v_row.shape == (1,)
  else:
    assert state.v_row.shape == expected_row and state.v_col.shape == expected_col
    assert state.v.shape == (1,)


def test_callable_rule_receives_path_and_per_leaf_tree():
  seen = []

  def rule(path, shape):
    seen.append((path, shape))
    return None if "embed" in path else (0, 1)

  params = {"embed": jnp.zeros((300, 200)), "dense": jnp.zeros((300, 200))}
  state = optax_rlx.scale_by_adafactor(factoring=rule).init(params)
  assert ("['embed']", (300, 200)) in seen
  assert state.v["embed"].shape == (300, 200) and state.v_row["dense"].shape == (300, 1)
  tree_rule = {"embed": "none", "dense": "last_two"}
  state = optax_rlx.scale_by_adafactor(factoring=tree_rule).init(params)
  assert state.v["embed"].shape == (300, 200) and state.v_row["dense"].shape == (300, 1)
