"""One Kron step on plain arrays: momentum → refit decision → refit → apply ``P`` and clip.

Every step's update is ``P m̂`` with ``P`` as it stands before the step's refit (if any): on a
refit step the fit runs after the update is taken. Where the fit's own pair already holds that
product (:meth:`~optax_rlx._kron_geometry.Geometry.preconditioned`: procrustes whitening fitted
on the momentum, the default) it is reused, else ``P`` is applied to ``m̂``. The fitting of each
unit is :mod:`optax_rlx._kron_geometry`; this module wires the leaves, layers and blocks to it,
one vmapped call per factor group.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_rlx import _common
from optax_rlx import _kron_numerics as numerics
from optax_rlx import _kron_plan as planning
from optax_rlx import _kron_state as state_lib
from optax_rlx._kron_geometry import FitInputs, Geometry, UnitFactors, fit_unit
from optax_rlx._kron_numerics import Dense
from optax_rlx._kron_options import KronConfig
from optax_rlx._kron_state import GroupFactors, KronState


def update(updates: Any, state: KronState, params: Any, obj_fn: Any,
           cfg: KronConfig) -> tuple[Any, KronState]:
  """``(updates, new KronState)`` after checking the inputs against the state."""
  layout = state_lib.check_inputs(updates, state, params, obj_fn, cfg)
  step = functools.partial(_step, obj_fn=obj_fn, layout=layout, cfg=cfg)
  if any(_common.explicit_spec(g) is not None for g in jax.tree.leaves(updates)):
    # Explicit-axes mesh: run the step with the mesh axes switched to Auto, so XLA's SPMD
    # partitioner places the contractions (as under an Auto mesh: partial products and
    # all-reduces, no gather of a whole leaf), and hand back the inputs' explicit shardings.
    # Inside, no array carries explicit axes, so the step's math needs no sharding names.
    typeof = lambda tree: jax.tree.map(lambda x: jax.typeof(x).sharding, tree)  # noqa: E731
    step = jax.sharding.auto_axes(step, out_sharding=(typeof(updates), typeof(state)))
  return step(updates, state, params)


class _Refit(NamedTuple):
  """What every group's refit shares within one step."""

  layout: planning.Layout
  cfg: KronConfig
  lr: jax.Array  # precond_lr at this step


def _step(updates: Any, state: KronState, params: Any, obj_fn: Any, layout: planning.Layout,
          cfg: KronConfig) -> tuple[Any, KronState]:
  """Momentum → refit decision → (refit, inside one ``lax.cond``) → apply and clip."""
  count, count_inc = state.count, optax.safe_increment(state.count)
  grads = jax.tree.leaves(updates)
  m_hat, new_mu = _momentum(updates, state.mu, count_inc, cfg)
  do_refit, new_acc = _refit_decision(count, state.precond_acc,
                                      cfg.options["precond_update_prob"])
  key, refit_key = jax.random.split(jax.random.wrap_key_data(state.key))
  state = state._replace(count=count_inc, key=jax.random.key_data(key), precond_acc=new_acc,
                         mu=new_mu)
  if not layout.groups:  # no leaves: nothing to fit or apply
    return updates, state
  m_units = _stack_units(layout, m_hat)
  lr = jnp.asarray(_common.schedule_value(cfg.options["precond_lr"], count), jnp.float32)
  ctx = _Refit(layout, cfg, lr)

  def refit(groups):
    batches = _fit_batches(refit_key, m_units, grads, (params, obj_fn), ctx)
    out = [_refit_group(i, g, x, m, ctx)
           for i, (g, x, m) in enumerate(zip(groups, batches, m_units, strict=True))]
    return [g for g, _ in out], [u for _, u in out]

  def keep(groups):
    return groups, [_precondition(g, m, group.dense)
                    for g, m, group in zip(groups, m_units, layout.groups, strict=True)]

  groups = state_lib.group_factors(state, layout)
  if cfg.refits_every_step:
    groups, units = refit(groups)  # no conditional (XLA runs it faster unwrapped)
  else:
    groups, units = jax.lax.cond(do_refit, refit, keep, groups)
  out = _leaf_updates(units, grads, layout, cfg.options["update_clip"])
  return jax.tree.unflatten(jax.tree.structure(updates), out), state_lib.with_groups(
      state, layout, groups)


def _momentum(updates: Any, mu: Any, count_inc: jax.Array,
              cfg: KronConfig) -> tuple[list[jax.Array], Any]:
  """``(m̂ leaves, new mu)``: the bias-corrected (optionally Nesterov) EMA of the gradients."""
  if not cfg.uses_momentum:
    return jax.tree.leaves(updates), mu
  b1 = cfg.options["b1"]
  assert b1 is not None  # uses_momentum
  new_mu = jax.tree.map(
      lambda g, m: (1.0 - b1) * g + b1 * m.astype(jnp.promote_types(m.dtype, g.dtype)),
      updates, mu,
  )
  t = count_inc.astype(jnp.float32)
  debias = 1.0 - b1**t
  if cfg.options["nesterov"]:
    debias_next = 1.0 - b1 ** (t + 1.0)
    m_hat = jax.tree.map(
        lambda m, g: b1 * m / debias_next + (1.0 - b1) * g / debias, new_mu, updates
    )
  else:
    m_hat = jax.tree.map(lambda m: m / debias, new_mu)
  return jax.tree.leaves(m_hat), jax.tree.map(lambda m, old: m.astype(old.dtype), new_mu, mu)


def _refit_decision(count: jax.Array, precond_acc: jax.Array,
                    update_prob: Any) -> tuple[jax.Array, jax.Array]:
  """``(refit?, new accumulator)``: refit whenever the running sum of ``p(t)`` reaches 1."""
  prob = jnp.clip(jnp.asarray(_common.schedule_value(update_prob, count), jnp.float32), 0, 1)
  acc = precond_acc + prob
  do_refit = acc >= 1.0
  return do_refit, jnp.where(do_refit, acc - 1.0, acc)


def _fit_batches(key: jax.Array, m_units: list[Any], grads: list[jax.Array],
                 newton_inputs: tuple[Any, Any], ctx: _Refit) -> list[FitInputs]:
  """Per group the stacked :class:`FitInputs`: whitening fits ``m̂`` or the gradient with no
  probe; Newton fits ``H v`` with ``v ~ N(0, I)``. Damping noise from the geometry.

  A unit whose gradient is all zero (a frozen param, a stretch without gradients) brings no new
  information, so its target is zero and its fit leaves it alone
  (:func:`~optax_rlx._kron_geometry.fit_unit`): fitted on the momentum alone, the whitening
  would follow the stale direction's decay and turn ``P`` ill-conditioned by many decades.
  """
  layout, options = ctx.layout, ctx.cfg.options
  noise_key = key
  if options["criterion"] == "newton":
    keys = jax.random.split(key, 1 + len(layout.plans))
    noise_key = keys[0]
    h_leaves, v_leaves = _hessian_probe(keys[1:], newton_inputs)
    h_units, v_units = _stack_units(layout, h_leaves), _stack_units(layout, v_leaves)
  else:
    g_units = _stack_units(layout, grads)
    h_units = g_units
    if options["precond_fit_on"] == "momentum":
      h_units = [None if g is None else jnp.where(_any_per_unit(g), m, jnp.zeros_like(m))
                 for g, m in zip(g_units, m_units, strict=True)]
    v_units = [None] * len(layout.groups)
  noise_units = _group_noise(noise_key, layout, ctx.cfg.geometry)
  return [FitInputs(h, v, x) for h, v, x in zip(h_units, v_units, noise_units, strict=True)]


def _group_noise(key: jax.Array, layout: planning.Layout, geometry: Geometry) -> list[Any]:
  """Per group the geometry's damping noise for all its units (padding included), drawn at the
  group's shape ``(size, *block_shape)`` (None for a group of empty units).

  Until 2026-12-05 the noise was drawn per leaf and stacked like the targets: the same
  distribution, but per-leaf slicing and stacking (on a 4-layer GPT-2 tree's 52 leaves, 16 more
  XLA kernels).
  """
  live = [g for g in layout.groups if 0 not in g.block_shape]
  noise = iter(geometry.damping_noise(key, [(g.size, *g.block_shape) for g in live],
                                      [jnp.dtype(g.dtypes.compute) for g in live]))
  return [None if 0 in g.block_shape else next(noise) for g in layout.groups]


def _any_per_unit(x: jax.Array) -> jax.Array:
  """Whether each unit (leading axis) of ``x`` has a nonzero entry, shaped to broadcast."""
  return jnp.any(x != 0, axis=tuple(range(1, x.ndim)), keepdims=True)


def _hessian_probe(keys: jax.Array,
                   newton_inputs: tuple[Any, Any]) -> tuple[list[jax.Array], list[jax.Array]]:
  """Per leaf ``(H v, v)``, ``v ~ N(0, I)``: one Hessian-vector product of ``obj_fn``."""
  params, obj_fn = newton_inputs
  leaves, treedef = jax.tree.flatten(params)
  probes = [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=True)]
  hvp = jax.jvp(jax.grad(obj_fn), (params,), (treedef.unflatten(probes),))[1]
  # jax.grad of a real loss is the conjugate of the gradient users pass (optax's convention for
  # complex params), so its derivative along v is conj(H v).
  return [jnp.conj(h) if jnp.iscomplexobj(h) else h for h in jax.tree.leaves(hvp)], probes


def _refit_group(index: int, group: GroupFactors, inputs: FitInputs, m_units: Any,
                 ctx: _Refit) -> tuple[GroupFactors, jax.Array | None]:
  """One fitting step of every unit of a group (one vmapped call), in float32 or wider.

  Returns the new :class:`GroupFactors` (factors as stored, ``P_i`` of them when cached) and
  the units' update ``P m̂`` with ``P`` before the step (None for a group of empty units).
  """
  layout_group = ctx.layout.groups[index]
  dense, geometry = layout_group.dense, ctx.cfg.geometry
  if 0 in layout_group.block_shape:  # empty units: nothing to fit
    return group, None
  before = _widened(group, dense, inputs.h.dtype)
  if ctx.cfg.options["precond_init_scale"] is None:  # one cond per group, not per unit
    before = _auto_scaled(before, inputs)
  read_p = before.precond if geometry.reads_cached_p else None
  fitted, preconditioned = jax.vmap(
      lambda u, x: fit_unit(u, x, dense, ctx.lr, ctx.cfg.fit)
  )(UnitFactors(before.factors, group.lips, read_p), inputs)
  numel = math.prod(layout_group.block_shape)
  factors = tuple(
      geometry.cleanup(q) if is_dense and geometry.needs_cleanup(n, numel) else q
      for q, is_dense, n in zip(fitted.factors, dense, layout_group.block_shape, strict=True))
  stored = tuple(q.astype(o.dtype) for q, o in zip(factors, group.factors, strict=True))
  precond = None
  if group.precond is not None:  # P of the factors as stored, so Ps is a function of Qs
    wide = numerics.cast_factors(stored, dense, inputs.h.dtype)
    precond = tuple(p.astype(o.dtype) for p, o in zip(
        jax.vmap(lambda f: numerics.precond_factors(f, dense))(wide), group.precond, strict=True))
  reuse = (ctx.cfg.options["criterion"] == "whitening"
           and ctx.cfg.options["precond_fit_on"] == "momentum" and preconditioned is not None)
  units = preconditioned if reuse else _apply(before, m_units, dense)
  return GroupFactors(stored, fitted.lips, precond), units


def _widened(group: GroupFactors, dense: Dense, dtype: Any) -> GroupFactors:
  """``group``'s factors (and cached ``P_i``) in the compute ``dtype``."""
  precond = None if group.precond is None else numerics.cast_factors(group.precond, dense, dtype)
  return GroupFactors(numerics.cast_factors(group.factors, dense, dtype), group.lips, precond)


def _auto_scaled(group: GroupFactors, inputs: FitInputs) -> GroupFactors:
  """The factors (and ``P_i``) of every unit that has not yet fitted (its Lipschitz estimates
  are still 0: the first step, or every step so far had a zero target, as for a frozen leaf or
  gradients below float32's normals) times the initial scale of its pair; a zero pair gives 1.
  Before 2026-12-04 only step 0 was scaled, so a leaf unfrozen later kept unit factors.

  Every other unit is multiplied by exactly 1 (bit-identical). No ``lax.cond``: computing the
  scale of every unit on every refit costs two reductions over its target, and a cond costs
  compile time for both branches (2026-12-05: ~10% of the default update's XLA kernels).
  """
  fresh = functools.reduce(jnp.logical_and, [lip == 0 for lip in group.lips])  # (units,)
  v_axis = None if inputs.v is None else 0
  scale = jax.vmap(numerics.initial_scale, in_axes=(0, v_axis))(inputs.h, inputs.v)
  scale = jnp.where(fresh, scale, jnp.ones_like(scale))
  p_axis = None if group.precond is None else 0
  factors, precond = jax.vmap(numerics.scale_factors, in_axes=(0, p_axis, 0))(
      group.factors, group.precond, scale)
  return group._replace(factors=factors, precond=precond)


def _precondition(group: GroupFactors, m_units: jax.Array | None, dense: Dense) -> jax.Array | None:
  """The units' ``P m̂`` from the stored factors (None for a group of empty units)."""
  if m_units is None:
    return None
  return _apply(_widened(group, dense, m_units.dtype), m_units, dense)


def _apply(group: GroupFactors, m_units: jax.Array, dense: Dense) -> jax.Array:
  """``P m̂`` per unit: from the cached ``P_i`` where there are any, else from the factors."""
  if group.precond is not None:
    return jax.vmap(lambda p, x: numerics.apply_precond(p, x, dense))(group.precond, m_units)
  return jax.vmap(lambda f, x: numerics.precondition(f, x, dense))(group.factors, m_units)


def _leaf_updates(units: list[Any], grads: list[jax.Array], layout: planning.Layout,
                  update_clip: Any) -> list[jax.Array]:
  """Per group ``units`` (``P m̂``) clipped by RMS per unit, back in each leaf's shape and its
  gradient's dtype (zeros for empty leaves)."""
  out = [jnp.zeros_like(g) for g in grads]
  for g, u in enumerate(units):
    if u is None:
      continue
    u = jax.vmap(lambda x: numerics.clip_by_rms(x, update_clip))(u)
    for i in layout.members(g):
      slot = layout.slots[i]
      unit = u[slot.start:slot.start + slot.count]
      out[i] = planning.from_units(unit, layout.plans[i]).astype(grads[i].dtype)
  return out


def _stack_units(layout: planning.Layout, leaves: list[jax.Array]) -> list[Any]:
  """Per group, its leaves' units of ``leaves`` in the group's compute dtype (float32 or wider:
  the params', whatever the gradients' dtype) stacked along the group axis (None for a group of
  empty units)."""
  units = [planning.to_units(x.astype(_compute_dtype(layout, i)), plan)
           for i, (x, plan) in enumerate(zip(leaves, layout.plans, strict=True))]
  return _stack_groups(layout, units)


def _compute_dtype(layout: planning.Layout, leaf: int) -> jnp.dtype:
  """The compute dtype of leaf ``leaf``'s factor group."""
  return jnp.dtype(layout.groups[layout.slots[leaf].group].dtypes.compute)


def _stack_groups(layout: planning.Layout, units: list[jax.Array]) -> list[Any]:
  """Per group, ``units`` (one ``(count, *block_shape)`` array per leaf) concatenated in storage
  order and zero-padded to the group's size; None for a group of empty units."""
  out: list[Any] = []
  for g, group in enumerate(layout.groups):
    if 0 in group.block_shape:
      out.append(None)
      continue
    pieces = [units[i] for i in layout.members(g)]
    pad = group.size - group.units
    if pad:
      pieces = [*pieces, jnp.zeros((pad, *pieces[0].shape[1:]), pieces[0].dtype)]
    out.append(pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces))
  return out
