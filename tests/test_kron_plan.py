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
  inner = planning.to_units(x, plan)
  assert inner.shape == (plan.units, *plan.block_shape)
  np.testing.assert_array_equal(planning.from_units(inner, plan), x)
  if plan.blocked and not stacked:  # the first unit is the leading corner block of the leaf
    corner = x[tuple(slice(0, d) for d in plan.block_shape)]
    np.testing.assert_array_equal(inner[0], corner)


F32 = planning.DtypeKey("float32", "float32", "float32")


def _leaves(shapes, stacked=None, dtypes=None):
  stacked = stacked or [False] * len(shapes)
  dtypes = dtypes or [F32] * len(shapes)
  return [planning.LeafSpec(f"[{i}]", tuple(s), k, d)
          for i, (s, k, d) in enumerate(zip(shapes, stacked, dtypes, strict=True))]


def _plans(shapes, budget, **kw):
  rule = _rule(max_skew_dense=2.0, dense_budget=budget, **kw)
  return planning.plan_leaves(_leaves(shapes), rule)


def test_dense_budget_admits_skewed_axes_least_skewed_first_and_by_whole_class():
  """Two (8, 24) matrices (3:1) and one (8, 32) (4:1) next to a vector: 1280 entries, base
  factors 3 · 64 = 192; the 24-axis class costs 2 · 576, the 32-axis class 1024."""
  shapes = [(8, 24), (8, 24), (8, 32), (640,)]
  dense = lambda plans: [p.dense for p in plans]  # noqa: E731
  assert dense(_plans(shapes, 0.0)) == [(True, False)] * 3 + [(False,)]
  # 192 + 1152 = 1344 > 1280: the 3:1 class does not fit whole, the 4:1 one (1216) does.
  assert dense(_plans(shapes, 1.0)) == [(True, False)] * 2 + [(True, True), (False,)]
  # 1.5 · 1280 = 1920: the 3:1 class first (1344), then the 4:1 one no longer fits (2368).
  assert dense(_plans(shapes, 1.5)) == [(True, True)] * 2 + [(True, False), (False,)]
  assert dense(_plans(shapes, float("inf"))) == [(True, True)] * 3 + [(False,)]
  for budget in (0.0, 1.0, 1.5):
    plans = _plans(shapes, budget)
    total = sum(int(np.prod(s)) for s in shapes)
    assert planning.dense_entries(plans) <= max(budget * total, 192)


def test_dense_budget_counts_layers_and_blocks_and_keeps_the_other_rules():
  rule = _rule(max_skew_dense=2.0, dense_budget=1.0, block_size=24)
  # A stacked (4, 8, 48) leaf in blocks of 24: 8 units of (8, 24), each 24² > 2 · 192 skewed;
  # 8 · (64 + 576) = 5120 entries > 1.0 · 1552: the 24-axes stay diagonal ...
  plans = planning.plan_leaves(_leaves([(4, 8, 48), (16,)], [True, False]), rule)
  assert plans[0].lead == (8,) and plans[0].dense == (True, False)
  # ... and fit 1.0 · 5536 once the tree holds more entries.
  plans = planning.plan_leaves(_leaves([(4, 8, 48), (4000,)], [True, False]), rule)
  assert plans[0].dense == (True, True)
  # Never past max_size_dense, min_ndim_dense or memory_save_mode, whatever the budget.
  for kw in ({"max_size_dense": 16}, {"min_ndim_dense": 3}, {"memory_save_mode": "one_diag"}):
    plans = planning.plan_leaves(
        _leaves([(8, 24), (10**6,)]), _rule(max_skew_dense=2.0, dense_budget=float("inf"), **kw))
    assert plans[0].dense[1] is False, kw


def test_layout_groups_units_by_factor_shapes_and_dtypes_in_leaf_order_and_pads():
  bf16 = planning.DtypeKey("bfloat16", "bfloat16", "float32")
  layout = planning.plan_layout(
      _leaves([(3, 2), (5,), (3, 2), (5,), (3, 2), (3, 2)], dtypes=[F32] * 5 + [bf16]),
      _rule(max_skew_dense=2.0), multiple=4)
  assert [(g.name, g.units, g.size) for g in layout.groups] == [
      ("3x3_2x2_float32", 3, 4), ("5_float32", 2, 4), ("3x3_2x2_bfloat16_float32", 1, 4)]
  assert [(s.group, s.start, s.count) for s in layout.slots] == [
      (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1), (0, 2, 1), (2, 0, 1)]
  assert layout.members(0) == [0, 2, 4] and layout.groups[0].factor_shapes == ((4, 3, 3), (4, 2, 2))
  assert layout.groups[2].factor_dtypes == ("bfloat16", "bfloat16")


def test_group_names_spell_factor_shapes_storage_and_compute_dtypes():
  def name(block_shape, dense, dtypes):
    return planning.FactorGroup(block_shape, dense, planning.DtypeKey(*dtypes), 1, 1).name

  assert name((64, 192), (True, True), ("float32",) * 3) == "64x64_192x192_float32"
  assert name((64, 256), (True, False), ("bfloat16", "bfloat16", "float32")) == (
      "64x64_256_bfloat16_float32")
  assert name((7,), (False,), ("complex64", "float32", "complex64")) == "7_float32_complex64"
  assert name((4, 4), (True, True), ("complex128", "float64", "complex128")) == (
      "4x4_4x4_complex128")
