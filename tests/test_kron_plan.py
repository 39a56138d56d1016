"""Kron's static plan on shapes alone: NumPy arrays, no JAX math."""

import numpy as np
import pytest

from optax_rlx import _kron_plan as planning

DEFAULT = planning.StructureRule(
    max_size_dense=8192, min_ndim_dense=2, max_skew_dense=1.0, memory_save_mode=None,
    block_size=None,
)


def _rule(**kw):
  return planning.StructureRule(**{**DEFAULT.__dict__, **kw})


@pytest.mark.parametrize(
    "shape, rule, dense",
    [
        ((), DEFAULT, (False,)),
        ((7,), DEFAULT, (False,)),
        ((4, 4), DEFAULT, (True, True)),
        ((64, 8), DEFAULT, (False, True)),  # 64² > 64·8: the long axis is diagonal
        ((1, 9), DEFAULT, (False, False)),  # size-1 axes are diagonal; 9² > 9
        ((4, 3, 5), DEFAULT, (True, True, True)),
        ((64, 8), _rule(max_skew_dense=float("inf")), (True, True)),
        ((20, 10), _rule(max_size_dense=15), (False, True)),
        ((6, 4), _rule(min_ndim_dense=3), (False, False)),
        ((6, 5, 4), _rule(memory_save_mode="one_diag"), (False, True, True)),
        ((5, 6, 6), _rule(memory_save_mode="one_diag"), (True, True, False)),  # last largest
        ((6, 4), _rule(memory_save_mode="all_diag"), (False, False)),
    ],
)
def test_structure_rule_picks_dense_axes(shape, rule, dense):
  plan = planning.make_plan(shape, False, rule, "['x']")
  assert plan.dense == dense
  assert plan.block_shape == (tuple(shape) or (1,))
  assert not plan.batched and plan.lead == ()


@pytest.mark.parametrize(
    "d, block_size, count",
    [(10, None, 1), (10, 10, 1), (12288, 4096, 3), (50257, 4096, 29), (13, 4, 13), (16, 5, 4)],
)
def test_block_count_is_the_fewest_equal_blocks(d, block_size, count):
  assert planning.block_count(d, block_size) == count
  if block_size is not None:
    assert d % count == 0 and d // count <= block_size


def test_stacked_and_blocked_plans_batch_layers_and_blocks():
  plan = planning.make_plan((3, 16, 6), True, _rule(block_size=8), "['s']")
  assert plan.block_shape == (8, 6) and plan.blocks == (2, 1)
  assert plan.lead == (6,)  # 3 layers x 2 blocks
  assert plan.factor_shapes == ((6, 8), (6, 6, 6))  # 8² > 8·6: the default skew rule
  with pytest.raises(ValueError, match=r"\['s'\].*stacked"):
    planning.make_plan((), True, DEFAULT, "['s']")


@pytest.mark.parametrize(
    "shape, stacked, block_size",
    [((12, 8), False, 4), ((3, 12, 10), True, 5), ((6, 9, 4), False, 3), ((5,), False, None),
     ((2, 7), True, None), ((), False, None)],
)
def test_inner_layout_round_trips_and_keeps_blocks_contiguous(shape, stacked, block_size):
  plan = planning.make_plan(shape, stacked, _rule(block_size=block_size), "['x']")
  x = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
  inner = planning.to_inner(x, plan)
  assert inner.shape == plan.lead + plan.block_shape
  np.testing.assert_array_equal(planning.from_inner(inner, plan), x)
  if plan.blocked and not stacked:  # the first unit is the leading corner block of the leaf
    corner = x[tuple(slice(0, d) for d in plan.block_shape)]
    np.testing.assert_array_equal(inner[0], corner)


def test_factor_shape_check_names_the_leaf():
  plan = planning.make_plan((4, 5), False, _rule(max_skew_dense=float("inf")), "['w']")
  planning.check_factor_shapes(plan, ((4, 4), (5, 5)), "['w']")
  with pytest.raises(ValueError, match=r"\['w'\].*\(4, 5\)"):
    planning.check_factor_shapes(plan, ((4, 4), (4, 4)), "['w']")
