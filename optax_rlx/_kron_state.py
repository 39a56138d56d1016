"""Kron's state: named factor groups, their initial value, the checks of a given state, and the
per-leaf view. The layout behind the names is derived from the params and the options
(:func:`tree_layout`), at ``init`` and at every trace of ``update``; the state holds only arrays.
"""

import typing
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_rlx import _common
from optax_rlx import _kron_plan as planning
from optax_rlx._kron_options import OWNER, KronConfig

# A group's arrays: one per axis of its units, each with a leading group axis.
GroupArrays = tuple[jax.Array, ...]

# Options whose change moves units between groups or changes their factors (for messages).
_LAYOUT_OPTIONS = ("`max_size_dense`, `min_ndim_dense`, `max_skew_dense`, `dense_budget`, "
                   "`memory_save_mode`, `block_size`, `stacked_layers` or `precond_dtype`")


class KronState(NamedTuple):
  """State of :func:`scale_by_kron`.

  For a leaf of shape ``(d_1, ..., d_r)`` the preconditioner is ``P = Qᴴ Q`` with
  ``Q = Q_1 ⊗ ... ⊗ Q_r``: ``Q_i`` is a dense ``(d_i, d_i)`` matrix (upper triangular, or
  Hermitian positive definite with ``geometry='procrustes'``) or a diagonal stored as ``(d_i,)``
  (real and positive). Scalars have one factor of shape ``(1,)``. A stacked leaf
  (``stacked_layers``) or a blocked one (``block_size``) has one set of factors per layer and
  block: its *fitting units*.

  Units with the same factor shapes and dtypes, of any leaves, form a *factor group*, stored as
  one array per axis with a leading group axis (units in leaf order, then layer and block), fitted
  by one vmapped call and shardable over devices (:func:`optax_rlx.state_sharding`). ``Qs``,
  ``Ls`` and ``Ps`` are dicts keyed by the group's name, which says what it holds: its factor
  shapes and storage dtype, e.g. ``Qs['64x64_192x192_float32']`` is a pair of arrays
  ``(units, 64, 64)`` and ``(units, 192, 192)``, ``Qs['64x64_256_float32']`` a dense and a
  diagonal factor. :func:`optax_rlx.kron_by_leaf` gives any of them per leaf. A params tree with
  no leaves has no groups: ``Qs`` and ``Ls`` (and ``Ps``) are then an empty float32 array.

  Attributes:
    count: int32 scalar, number of updates so far.
    key: uint32 PRNG key data (``jax.random.key_data``), split every step.
    precond_acc: float32 scalar, running sum of refit probabilities; a refit happens whenever it
      reaches 1 (a deterministic realisation of ``precond_update_prob``).
    mu: pytree like the params, momentum in ``mu_dtype``; ``()`` without momentum.
    Qs: ``{group name: factors}``, in ``precond_dtype``.
    Ls: ``{group name: estimates}``, one float32 ``(units,)`` array per axis: the square root
      of each factor's Lipschitz estimate ``L`` (its fitting step is ``μ / L``; the root keeps
      it in float32's range for gradients of any float32 scale).
    Ps: with ``cache_precond``, ``{group name: P_i}`` like ``Qs``, holding ``P_i = Q_iᴴ Q_i``
      (dense) or ``q_i²`` (diagonal), recomputed at each refit, so steps without one apply ``P``
      with one matmul per dense factor; ``()`` without the cache.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
  key: jax.Array
  precond_acc: jax.Array
  mu: optax.Updates
  Qs: Any
  Ls: Any
  Ps: Any = ()


class GroupFactors(NamedTuple):
  """One factor group's part of the state (see :class:`KronState`)."""

  factors: GroupArrays
  lips: GroupArrays
  precond: GroupArrays | None


def tree_layout(tree: Any, cfg: KronConfig) -> planning.Layout:
  """The :class:`~optax_rlx._kron_plan.Layout` of ``tree``'s leaves (arrays or
  ``jax.ShapeDtypeStruct``) under ``cfg``'s structure options."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  stacked_layers = cfg.options["stacked_layers"]
  if stacked_layers is None:
    stacked = [False] * len(leaves)
  else:
    stacked = [bool(s) for s in jax.tree.leaves(_common.resolve_mask(stacked_layers, tree))]
  specs = [
      planning.LeafSpec(path=_common.path_str(path), shape=tuple(x.shape), stacked=s,
                        dtypes=_dtype_key(x.dtype, cfg.options["precond_dtype"]))
      for (path, x), s in zip(leaves, stacked, strict=True)
  ]
  return planning.plan_layout(specs, cfg.structure, cfg.group_multiple,
                              cfg.geometry.dense_kind)


def init_state(params: Any, cfg: KronConfig) -> KronState:
  """Momentum zeros, factors ``s^(1/r) I`` (``s = precond_init_scale``, else 1 until the first
  refit sets it), zero Lipschitz estimates, and (with ``cache_precond``) ``P_i = s^(2/r) I``."""
  _common.check_inexact_leaves(OWNER, params, "params")
  mu = _common.momentum_like(params, cfg.options["mu_dtype"]) if cfg.uses_momentum else ()
  layout = tree_layout(params, cfg)
  cache = cfg.options["cache_precond"]
  qs: Any
  ls: Any
  ps: Any
  if not layout.groups:  # one array each: a donated state must not hold a buffer twice
    qs, ls = _no_groups(), _no_groups()
    ps = _no_groups() if cache else ()
  else:
    groups = [_initial_group(group, cfg) for group in layout.groups]
    groups = _explicit_layout(groups, layout, jax.tree.leaves(params), cfg)
    names = [group.name for group in layout.groups]
    qs = {n: g.factors for n, g in zip(names, groups, strict=True)}
    ls = {n: g.lips for n, g in zip(names, groups, strict=True)}
    ps = {n: g.precond for n, g in zip(names, groups, strict=True)} if cache else ()
  return KronState(count=jnp.zeros([], jnp.int32), key=jnp.asarray(cfg.key_data),
                   precond_acc=jnp.ones([], jnp.float32), mu=mu, Qs=qs, Ls=ls, Ps=ps)


def check_inputs(updates: Any, state: Any, params: Any, obj_fn: Any,
                 cfg: KronConfig) -> planning.Layout:
  """Raises ``ValueError`` for a foreign state, mismatched trees or shapes, a state made for
  another layout, or missing Newton inputs; returns the updates' layout."""
  if not isinstance(state, KronState):
    raise ValueError(f"{OWNER}: expected a KronState, got {type(state).__name__}.")
  _common.check_inexact_leaves(OWNER, updates, "the updates")
  has_momentum = not (isinstance(state.mu, tuple) and not state.mu)
  if cfg.uses_momentum != has_momentum and jax.tree.leaves(updates):
    raise ValueError(
        f"{OWNER}: the state {'has a' if has_momentum else 'has no'} momentum, but this transform "
        f"has b1={cfg.options['b1']!r} ({'None turns' if has_momentum else 'a number keeps'} it "
        f"{'off' if has_momentum else 'on'}); init and update with the same options."
    )
  if cfg.uses_momentum:
    _common.check_same_shapes(OWNER, state.mu, "the optimizer state", updates, "the updates")
  if params is not None:
    _common.check_same_shapes(OWNER, params, "the params", updates, "the updates")
  # The params' dtypes decide the factors' (gradients may come in another precision).
  layout = tree_layout(updates if params is None else params, cfg)
  _check_groups(state, layout, cfg)
  if cfg.options["criterion"] == "newton":
    if obj_fn is None:
      raise ValueError(
          f"{OWNER}: criterion='newton' needs `obj_fn` (params -> scalar loss) passed to "
          f"`update(grads, state, params, obj_fn=...)`."
      )
    if params is None:
      raise ValueError(f"{OWNER}: criterion='newton' needs `params` passed to `update`.")
    _check_objective(obj_fn, params)
  return layout


def group_factors(state: KronState, layout: planning.Layout) -> list[GroupFactors]:
  """The state's groups, in ``layout``'s order (checked by :func:`check_inputs`)."""
  return [
      GroupFactors(factors=_common.as_tuple(state.Qs[g.name]),
                   lips=_common.as_tuple(state.Ls[g.name]),
                   precond=_common.as_tuple(state.Ps[g.name]) if has_cache(state) else None)
      for g in layout.groups
  ]


def with_groups(state: KronState, layout: planning.Layout,
                groups: list[GroupFactors]) -> KronState:
  """``state`` holding ``groups`` (in ``layout``'s order)."""
  names = [g.name for g in layout.groups]
  return state._replace(
      Qs={n: g.factors for n, g in zip(names, groups, strict=True)},
      Ls={n: g.lips for n, g in zip(names, groups, strict=True)},
      Ps={n: g.precond for n, g in zip(names, groups, strict=True)} if has_cache(state) else (),
  )


def by_leaf(groups: Mapping[str, GroupArrays], layout: planning.Layout, treedef: Any) -> Any:
  """A pytree like the params whose leaves are tuples of that leaf's arrays in ``groups``
  (``Qs``, ``Ls`` or ``Ps``): ``(d, d)`` / ``(d,)`` per axis (``()`` for estimates), with a
  leading ``(layers · blocks,)`` axis for stacked or blocked leaves."""
  per_leaf = []
  for plan, slot in zip(layout.plans, layout.slots, strict=True):
    arrays = _common.as_tuple(groups[layout.groups[slot.group].name])
    per_leaf.append(tuple(_take(x, slot, plan.batched) for x in arrays))
  return treedef.unflatten(per_leaf)


def _check_objective(obj_fn: Any, params: Any) -> None:
  """Raises ``ValueError`` unless ``obj_fn(params)`` is a real scalar (traced shapes only)."""
  masked = any(isinstance(x, optax.MaskedNode)
               for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
  try:
    out = jax.eval_shape(obj_fn, params)
  except Exception as e:
    if not masked:
      raise
    raise ValueError(
        f"{OWNER}: criterion='newton' under optax.masked or optax.multi_transform calls `obj_fn` "
        f"with the params Kron sees, optax.MaskedNode where a leaf is not Kron's, and `obj_fn` "
        f"failed on that ({type(e).__name__}: {e}). Pass "
        f"`obj_fn=optax_rlx.fill_masked(loss, params)` to fill those places from the full params."
    ) from e
  leaves = jax.tree.leaves(out)
  if (len(leaves) != 1 or tuple(leaves[0].shape) != ()
      or not jnp.issubdtype(leaves[0].dtype, jnp.floating)):
    got = jax.tree.map(lambda x: f"{x.dtype}{list(x.shape)}", out)
    raise ValueError(
        f"{OWNER}: criterion='newton' needs `obj_fn(params)` to return a real scalar (the loss "
        f"whose Hessian-vector products are fitted); it returned {got}."
    )


def has_cache(state: KronState) -> bool:
  """Whether ``state`` holds cached ``P_i`` (``cache_precond``): ``Ps`` is not ``()``."""
  return not (isinstance(state.Ps, tuple) and not state.Ps)


def _dtype_key(param_dtype: Any, precond_dtype: Any) -> planning.DtypeKey:
  """Dense factors of complex params are complex (``precond_dtype`` names their precision);
  diagonal factors are always real; computations run in float32 or wider."""
  compute = _common.stats_dtype(param_dtype)
  dense = (compute if precond_dtype is None
           else _common.like_param_dtype(precond_dtype, param_dtype))
  return planning.DtypeKey(dense=jnp.dtype(dense).name,
                           diagonal=_common.real_dtype(dense).name,
                           compute=jnp.dtype(compute).name)


def _no_groups() -> jax.Array:
  """The ``Qs`` (``Ls``, ``Ps``) of a params tree with no leaves: one array, so that
  ``optax.tree.map_params`` (which inits on a leafless placeholder) sees factor state there."""
  return jnp.zeros((0,), jnp.float32)


def _initial_group(group: planning.FactorGroup, cfg: KronConfig) -> GroupFactors:
  scale = cfg.options["precond_init_scale"]
  per_factor = jnp.asarray(1.0 if scale is None else scale, jnp.float32)
  per_factor = per_factor ** (1.0 / len(group.block_shape))
  cache = cfg.options["cache_precond"]
  return GroupFactors(
      factors=_scaled_identities(group, per_factor),
      lips=tuple(jnp.zeros((group.size,), jnp.float32) for _ in group.block_shape),
      precond=_scaled_identities(group, per_factor**2) if cache else None,
  )


def _scaled_identities(group: planning.FactorGroup, per_factor: jax.Array) -> GroupArrays:
  """Per axis ``per_factor · I`` (dense) or ``per_factor · 1`` (diagonal) for every unit."""
  return tuple(
      jnp.broadcast_to(per_factor * (jnp.eye(d) if is_dense else jnp.ones(d)),
                       shape).astype(dtype)
      for d, is_dense, shape, dtype in zip(group.block_shape, group.dense, group.factor_shapes,
                                           group.factor_dtypes, strict=True)
  )


def _explicit_layout(groups: list[GroupFactors], layout: planning.Layout, params: list,
                     cfg: KronConfig) -> list[GroupFactors]:
  """Under an explicit-axes mesh, each group's arrays sharded along the group axis over
  ``group_axes`` (:func:`optax_rlx.state_sharding` reads this layout); as is otherwise."""
  specs = [_common.explicit_spec(p) for p in params]
  if all(spec is None for spec in specs):
    return groups
  mesh = next(jax.typeof(p).sharding.mesh for p, e in zip(params, specs, strict=True)
              if e is not None)
  axes = typing.cast(tuple[str, ...] | None, cfg.options["group_axes"])  # make_config's tuple

  def place(group, arrays):
    if arrays is None:
      return None
    return tuple(jax.sharding.reshard(x, _common.group_spec(group.size, x.ndim, axes, mesh,
                                                            OWNER)) for x in arrays)

  return [GroupFactors(*(place(group, part) for part in g))
          for group, g in zip(layout.groups, groups, strict=True)]


def _take(x: Any, slot: planning.Slot, batched: bool) -> Any:
  """A slot's units of a group array (or of a ``jax.ShapeDtypeStruct``, shape only)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    lead = (slot.count,) if batched else ()
    return jax.ShapeDtypeStruct(lead + tuple(x.shape[1:]), x.dtype)
  return x[slot.start:slot.start + slot.count] if batched else x[slot.start]


def _check_groups(state: KronState, layout: planning.Layout, cfg: KronConfig) -> None:
  """Raises ``ValueError`` naming the group (and leaf, and options) where the state's factor
  groups differ from what ``layout`` expects."""
  cache = cfg.options["cache_precond"]
  if cache != has_cache(state):
    have = "has" if has_cache(state) else "has no"
    raise ValueError(
        f"{OWNER}: the state {have} cached preconditioner factors (`Ps`) but this transform "
        f"has cache_precond={cache}; init and update with the same options."
    )
  fields = {"Qs": state.Qs, "Ls": state.Ls, **({"Ps": state.Ps} if cache else {})}
  if not layout.groups:
    return
  for field, groups in fields.items():
    if not isinstance(groups, Mapping):
      raise ValueError(
          f"{OWNER}: the state's `{field}` is a {type(groups).__name__}, not the dict of "
          f"factor groups that init makes for these params."
      )
  names = {g.name for g in layout.groups}
  extra = sorted(set(state.Qs) - names)
  for index, group in enumerate(layout.groups):
    if group.name not in state.Qs:
      _raise_missing(group, index, layout, sorted(state.Qs))
    for field, groups in fields.items():
      _check_group_arrays(field, group, index, _common.as_tuple(groups[group.name]), layout)
  if extra:
    raise ValueError(
        f"{OWNER}: the state has factor groups {extra} that these updates do not have; was it "
        f"made for other params, or with other {_LAYOUT_OPTIONS}?"
    )


def _raise_missing(group: planning.FactorGroup, index: int, layout: planning.Layout,
                   have: list[str]) -> None:
  i = layout.members(index)[0]
  plan = layout.plans[i]
  other_dtype = [name for name in have if name.startswith(group.shapes + "_")
                 and name[len(group.shapes) + 1:][:1].isalpha()]
  if other_dtype:
    raise ValueError(
        f"{OWNER}: leaf {layout.paths[i]}'s factors are in the state as {other_dtype}, not as "
        f"{group.name!r}: the state was made with another `geometry` or `precond_dtype`, or for "
        f"params of another dtype (pass `params` to `update` when the gradients' dtype differs "
        f"from the params': the params decide the factors' dtype)."
    )
  raise ValueError(
      f"{OWNER}: leaf {layout.paths[i]} has gradient shape {plan.leaf_shape}, whose "
      f"preconditioner factors {plan.factor_shapes} belong in factor group {group.name!r}, "
      f"which the state does not have (its groups: {have}); was it made for other params, or "
      f"with other {_LAYOUT_OPTIONS}?"
  )


def _check_group_arrays(field: str, group: planning.FactorGroup, index: int,
                        arrays: tuple, layout: planning.Layout) -> None:
  expected: tuple[tuple[int, ...], ...]
  if field == "Ls":
    expected = tuple((group.size,) for _ in group.block_shape)
  else:
    expected = group.factor_shapes
  got = tuple(tuple(x.shape) for x in arrays)
  if got == expected:
    return
  leaves = ", ".join(layout.paths[i] for i in layout.members(index)[:5])
  raise ValueError(
      f"{OWNER}: factor group {group.name!r} (leaves {leaves}) has {field} of shapes {got} in "
      f"the state, but these updates need {expected} ({group.units} units padded to "
      f"{group.size}); was the state made with another `group_multiple`, or for other params "
      f"or with other {_LAYOUT_OPTIONS}?"
  )
