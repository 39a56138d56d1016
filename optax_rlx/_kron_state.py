"""Kron's state: its layout per leaf (from the static plans), its initial value and its checks."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_rlx import _common
from optax_rlx import _kron_plan as planning
from optax_rlx._kron_config import OWNER, KronConfig


class KronState(NamedTuple):
  """State of :func:`scale_by_kron`.

  For a leaf of shape ``(d_1, ..., d_r)`` the preconditioner is ``P = Qᵀ Q`` with
  ``Q = Q_1 ⊗ ... ⊗ Q_r``: ``Q_i`` is a dense ``(d_i, d_i)`` matrix (upper triangular, or
  symmetric positive definite with ``geometry='procrustes'``) or a diagonal stored as ``(d_i,)``.
  Scalars have one factor of shape ``(1,)``. A stacked leaf (``stacked_layers``) or a blocked one
  (``block_size``) has one set of factors per layer and block. For a complex leaf ``P = Qᴴ Q``:
  dense factors are complex (Hermitian positive definite with ``'procrustes'``), diagonal
  factors real and positive.

  The factors are stored by *factor group* (:class:`FactorGroups`): all fitting units with the
  same factor shapes and dtypes share arrays with a leading group axis, fitted by one vmapped
  call and shardable over devices (:func:`optax_rlx.state_sharding`). ``Qs.by_leaf()`` gives the
  per-leaf view: a pytree like the params of tuples of factors (with a leading
  ``(layers · blocks,)`` axis for stacked or blocked leaves).

  Attributes:
    count: int32 scalar, number of updates so far.
    key: uint32 PRNG key data (``jax.random.key_data``), split every step.
    precond_acc: float32 scalar, running sum of refit probabilities; a refit happens whenever it
      reaches 1 (a deterministic realisation of ``precond_update_prob``).
    mu: pytree like the params, momentum in ``mu_dtype``; ``()`` without momentum.
    Qs: :class:`FactorGroups` of the factors, in ``precond_dtype``.
    Ls: :class:`FactorGroups` like ``Qs`` with one float32 per unit and factor: each factor's
      Lipschitz estimate normalising its fitting step.
    Ps: with ``cache_precond``, :class:`FactorGroups` like ``Qs`` holding ``P_i = Q_iᴴ Q_i``
      (dense) or ``q_i²`` (diagonal), recomputed at each refit, so steps without one apply
      ``P`` with one matmul per dense factor; ``()`` without the cache.
  """

  count: jax.Array
  key: jax.Array
  precond_acc: jax.Array
  mu: optax.Updates
  Qs: Any
  Ls: Any
  Ps: Any = ()



def leaf_plans(tree, cfg: KronConfig) -> list[planning.LeafPlan]:
  """One plan per leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if cfg.stacked_layers is None:
    stacked = [False] * len(leaves)
  else:
    stacked = jax.tree.leaves(_common.resolve_mask(cfg.stacked_layers, tree))
  return planning.plan_leaves([tuple(x.shape) for _, x in leaves], [bool(s) for s in stacked],
                              cfg.structure, [_common.path_str(path) for path, _ in leaves])


@dataclasses.dataclass(frozen=True)
class GroupLayout:
  """Static layout of a :class:`FactorGroups`: the groups and where each leaf's units sit.

  Attributes:
    treedef: the params' tree structure.
    groups: the :class:`~optax_rlx._kron_plan.FactorGroup` of every group, in storage order.
    slots: one :class:`~optax_rlx._kron_plan.Slot` per leaf.
    batched: per leaf, whether its factors carry a leading axis of layers and blocks.
    group_axes: the mesh axes the group axis is sharded over (``scale_by_kron``'s option).
  """

  treedef: Any
  groups: tuple[planning.FactorGroup, ...]
  slots: tuple[planning.Slot, ...]
  batched: tuple[bool, ...]
  group_axes: tuple[str, ...] | None = None


@jax.tree_util.register_pytree_with_keys_class
class FactorGroups:
  """Per-unit arrays of Kron's state (factors or Lipschitz estimates), stored by factor group.

  Every fitting unit (a leaf, a layer of a stacked leaf, a block) whose factors have the same
  shapes and dtypes sits in one group: ``groups[k]`` is a tuple with one array per axis of the
  units, each with a leading group axis of length ``layout.groups[k].size``. The group axis is
  what :func:`optax_rlx.state_sharding` shards, so each device stores and fits its share.
  :meth:`by_leaf` gives the per-leaf view.
  """

  __slots__ = ("groups", "layout")

  def __init__(self, groups, layout):
    self.groups = tuple(groups)
    self.layout = layout

  def tree_flatten_with_keys(self):
    keys = [jax.tree_util.SequenceKey(i) for i in range(len(self.groups))]
    return tuple(zip(keys, self.groups, strict=True)), self.layout

  def tree_flatten(self):
    return self.groups, self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(children, layout)

  def __eq__(self, other):
    return (isinstance(other, FactorGroups) and self.layout == other.layout
            and self.groups == other.groups)

  __hash__ = None

  def __repr__(self):
    return f"FactorGroups({self.groups!r})"

  def by_leaf(self) -> Any:
    """A pytree like the params whose leaves are tuples of that leaf's factors (or estimates):
    ``(d, d)`` / ``(d,)`` per axis, with a leading ``(layers · blocks,)`` axis when batched."""
    per_leaf = []
    for slot, batched in zip(self.layout.slots, self.layout.batched, strict=True):
      group = _common.as_tuple(self.groups[slot.group])
      per_leaf.append(tuple(_take(x, slot, batched) for x in group))
    return self.layout.treedef.unflatten(per_leaf)


def _take(x, slot, batched: bool):
  """A slot's units of a group array (or of a ``jax.ShapeDtypeStruct``, shape only)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    lead = (slot.count,) if batched else ()
    return jax.ShapeDtypeStruct(lead + tuple(x.shape[1:]), x.dtype)
  return x[slot.start:slot.start + slot.count] if batched else x[slot.start]


def _dtype_key(param, plan, cfg: KronConfig) -> tuple[str, ...]:
  factors = tuple(str(cfg.factor_dtype(param.dtype, d)) for d in plan.dense)
  return (*factors, str(_common.stats_dtype(param.dtype)))


def group_layout(tree, cfg: KronConfig) -> tuple[GroupLayout, list[planning.LeafPlan]]:
  """The factor-group layout of ``tree`` (params or updates) and its leaves' plans."""
  plans = leaf_plans(tree, cfg)
  leaves, treedef = jax.tree.flatten(tree)
  keys = [_dtype_key(x, plan, cfg) for x, plan in zip(leaves, plans, strict=True)]
  groups, slots = planning.group_units(plans, keys, cfg.group_multiple)
  layout = GroupLayout(treedef=treedef, groups=groups, slots=slots,
                       batched=tuple(plan.batched for plan in plans), group_axes=cfg.group_axes)
  return layout, plans


def _scaled_identities(group: planning.FactorGroup, per_factor):
  """Per axis ``per_factor · I`` (dense) or ``per_factor · 1`` (diagonal) for every unit."""
  return tuple(
      jnp.broadcast_to(per_factor * (jnp.eye(d) if is_dense else jnp.ones(d)),
                       shape).astype(dtype)
      for d, is_dense, shape, dtype in zip(
          group.block_shape, group.dense, group.factor_shapes,
          group.dtypes[:len(group.block_shape)], strict=True)
  )


def _init_group(group: planning.FactorGroup, cfg: KronConfig):
  """Factors ``s^(1/r) I`` (dense) or ``s^(1/r) 1`` (diagonal) per unit, zero estimates, and
  (with ``cache_precond``) their ``P_i = s^(2/r) I``, else ``()``."""
  scale = 1.0 if cfg.init_scale is None else cfg.init_scale
  per_factor = jnp.asarray(scale, jnp.float32) ** (1.0 / len(group.block_shape))
  factors = _scaled_identities(group, per_factor)
  lips = tuple(jnp.zeros((group.size,), jnp.float32) for _ in group.block_shape)
  precond = _scaled_identities(group, per_factor**2) if cfg.cache_precond else ()
  return factors, lips, precond


def _explicit_layout(per_group, layout: GroupLayout, params):
  """Under an explicit-axes mesh, each group's arrays sharded along the group axis as
  :func:`optax_rlx.state_sharding` lays them out (``layout.group_axes``); as is otherwise."""
  specs = [_common.explicit_spec(p) for p in params]
  if all(spec is None for spec in specs):
    return per_group
  mesh = next(jax.typeof(p).sharding.mesh for p, e in zip(params, specs, strict=True)
              if e is not None)
  out = []
  for group, arrays in zip(layout.groups, per_group, strict=True):
    out.append(tuple(
        tuple(jax.sharding.reshard(x, _common.group_spec(group.size, x.ndim, layout.group_axes,
                                                         mesh, OWNER)) for x in part)
        for part in arrays))
  return out


def init_state(params, cfg: KronConfig) -> KronState:
  _common.check_inexact_leaves(OWNER, params, "params")
  mu = _common.momentum_like(params, cfg.mu_dtype) if cfg.use_momentum else ()
  params, _ = _common.split_variables(params)  # factors never take a param's NNX metadata
  layout, _ = group_layout(params, cfg)
  per_group = [_init_group(group, cfg) for group in layout.groups]
  per_group = _explicit_layout(per_group, layout, jax.tree.leaves(params))
  qs = FactorGroups([factors for factors, _, _ in per_group], layout)
  ls = FactorGroups([lips for _, lips, _ in per_group], layout)
  ps = FactorGroups([p for _, _, p in per_group], layout) if cfg.cache_precond else ()
  if layout.treedef.num_leaves == 0:
    # No leaves, no factors: the empty params tree itself, as every params-like part of an
    # optax state (so `optax.tree.map_params`' placeholder init lines up with real states).
    qs = ls = params
    ps = params if cfg.cache_precond else ()
  return KronState(
      count=jnp.zeros([], jnp.int32),
      key=jnp.asarray(cfg.key_data),
      precond_acc=jnp.ones([], jnp.float32),
      mu=mu,
      Qs=qs,
      Ls=ls,
      Ps=ps,
  )


def _leaf_factor_shapes(layout: GroupLayout, i: int) -> tuple[tuple[int, ...], ...]:
  """Leaf ``i``'s factor shapes in ``layout`` (as ``LeafPlan.factor_shapes`` gives them)."""
  slot = layout.slots[i]
  lead = (slot.count,) if layout.batched[i] else ()
  return tuple(lead + s[1:] for s in layout.groups[slot.group].factor_shapes)


def _check_layout(state_layout: GroupLayout, layout: GroupLayout, plans, paths) -> None:
  """Raises ``ValueError`` naming the first leaf whose factors the state shapes differently,
  or the options that change a layout without changing any leaf's factor shapes."""
  if state_layout == layout:
    return
  for i, (plan, path) in enumerate(zip(plans, paths, strict=True)):
    planning.check_factor_shapes(plan, _leaf_factor_shapes(state_layout, i), path)
  raise ValueError(
      f"{OWNER}: the state's factor groups (sizes {[g.size for g in state_layout.groups]}, "
      f"sharded over {state_layout.group_axes}) do not match these updates' layout (sizes "
      f"{[g.size for g in layout.groups]}, sharded over {layout.group_axes}); was it made with "
      f"another `group_multiple`, `group_axes` or `precond_dtype`?"
  )


def check_inputs(updates, state, params, obj_fn, cfg: KronConfig):
  """Raises ``ValueError`` for a foreign state, mismatched trees or shapes, or missing Newton
  inputs; returns the state's layout and the leaves' plans."""
  if not isinstance(state, KronState):
    raise ValueError(f"{OWNER}: expected a KronState, got {type(state).__name__}.")
  _common.check_inexact_leaves(OWNER, updates, "the updates")
  # No leaves: init kept the (empty) params tree as `Qs`, there is no layout to compare.
  empty = not jax.tree.leaves(updates) and not jax.tree.leaves(state.Qs)
  if not empty and not isinstance(state.Qs, FactorGroups):
    raise ValueError(
        f"{OWNER}: the state's `Qs` is a {type(state.Qs).__name__}, not the FactorGroups "
        f"that init makes."
    )
  if not empty and cfg.cache_precond != isinstance(state.Ps, FactorGroups):
    have = "has" if isinstance(state.Ps, FactorGroups) else "has no"
    raise ValueError(
        f"{OWNER}: the state {have} cached preconditioner factors (`Ps`) but this transform "
        f"has cache_precond={cfg.cache_precond}; init and update with the same options."
    )
  if not empty and state.Qs.layout.treedef != jax.tree.structure(updates):
    _common.check_same_structure(
        OWNER, state.Qs.layout.treedef.unflatten([0] * state.Qs.layout.treedef.num_leaves),
        "the optimizer state", updates, "the updates",
    )
  if params is not None:
    _common.check_same_shapes(OWNER, params, "the params", updates, "the updates")
  layout, plans = group_layout(updates, cfg)
  if not empty:
    paths = [_common.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
    _check_layout(state.Qs.layout, layout, plans, paths)
  if cfg.criterion == "newton":
    if obj_fn is None:
      raise ValueError(
          f"{OWNER}: criterion='newton' needs `obj_fn` (params -> scalar loss) passed to "
          f"`update(grads, state, params, obj_fn=...)`."
      )
    if params is None:
      raise ValueError(f"{OWNER}: criterion='newton' needs `params` passed to `update`.")
  return layout, plans
