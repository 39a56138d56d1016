"""One Kron step on plain arrays: momentum → refit decision → refit → apply ``P`` and clip.

The fitting and applying of each unit is :mod:`optax_rlx._kron_numerics`; this module wires the
leaves, layers and blocks to it (``jax.vmap`` over a plan's leading axis) and builds the new state.
"""

import math

import jax
import jax.numpy as jnp
import optax

from optax_rlx import _common
from optax_rlx import _kron_numerics as numerics
from optax_rlx import _kron_plan as planning
from optax_rlx._kron_config import KronConfig
from optax_rlx._kron_state import FactorGroups, KronState, check_inputs


def _momentum(updates, mu, count_inc, cfg: KronConfig):
  """``(m̂ leaves, new mu)``: the bias-corrected (optionally Nesterov) EMA of the gradients."""
  if not cfg.use_momentum:
    return jax.tree.leaves(updates), mu
  b1 = cfg.b1
  new_mu = jax.tree.map(
      lambda g, m: (1.0 - b1) * g + b1 * m.astype(jnp.promote_types(m.dtype, g.dtype)),
      updates, mu,
  )
  t = count_inc.astype(jnp.float32)
  debias = 1.0 - b1**t
  if cfg.nesterov:
    debias_next = 1.0 - b1 ** (t + 1.0)
    m_hat = jax.tree.map(
        lambda m, g: b1 * m / debias_next + (1.0 - b1) * g / debias, new_mu, updates
    )
  else:
    m_hat = jax.tree.map(lambda m: m / debias, new_mu)
  return jax.tree.leaves(m_hat), jax.tree.map(lambda m, old: m.astype(old.dtype), new_mu, mu)


def _refit_decision(count, precond_acc, cfg: KronConfig):
  """``(refit?, new accumulator)``: refit whenever the running sum of ``p(t)`` reaches 1."""
  prob = jnp.clip(jnp.asarray(_common.schedule_value(cfg.update_prob, count), jnp.float32), 0, 1)
  acc = precond_acc + prob
  do_refit = acc >= 1.0
  return do_refit, jnp.where(do_refit, acc - 1.0, acc)


def _fitting_pairs(keys, fit_targets, params, obj_fn, treedef, cfg: KronConfig):
  """Per leaf ``(h, v)``: whitening ``(target, None)``; Newton ``(H v, v)``, ``v ~ N(0, I)``."""
  if cfg.criterion != "newton":
    return fit_targets, [None] * len(fit_targets)
  probes = [
      jax.random.normal(k, p.shape, p.dtype)
      for k, p in zip(keys, jax.tree.leaves(params), strict=True)
  ]
  hvp = jax.jvp(jax.grad(obj_fn), (params,), (treedef.unflatten(probes),))[1]
  # jax.grad of a real loss is the conjugate of the gradient users pass (optax's convention for
  # complex params), so its derivative along v is conj(H v).
  return [jnp.conj(h) if jnp.iscomplexobj(h) else h for h in jax.tree.leaves(hvp)], probes


def _noise(keys, plans, targets, geometry):
  """Per leaf the noise that damps ``h``, shaped ``plan.lead + plan.block_shape``: random signs
  for procrustes (every leaf's from one draw of random words, with ``keys[0]``: on the CPU each
  draw is a loop of its own); ``N(0, I)`` for triangular (one key per leaf), whose whitening fit
  also uses it as the probe ``v`` (SPEC 2.1)."""
  shapes = [plan.lead + plan.block_shape for plan in plans]
  dtypes = [_common.stats_dtype(h.dtype) for h in targets]
  if geometry == "triangular":
    return [jax.random.normal(k, s, d) for k, s, d in zip(keys, shapes, dtypes, strict=True)]
  counts = [numerics.sign_words(s, d) for s, d in zip(shapes, dtypes, strict=True)]
  words = jax.random.bits(keys[0], (max(sum(counts), 1),), jnp.uint32)
  noise, start = [], 0
  for count, shape, dtype in zip(counts, shapes, dtypes, strict=True):
    noise.append(numerics.signs_from_words(words[start:start + count], shape, dtype))
    start += count
  return noise


def _unit_inputs(plan, h, v, noise):
  """A leaf's fitting inputs as ``(count,) + block_shape`` units, in float32 or wider."""
  compute = _common.stats_dtype(h.dtype)
  if not plan.batched:
    noise = noise[None]
  h_units = planning.to_units(h.astype(compute), plan)
  v_units = None if v is None else planning.to_units(v.astype(compute), plan)
  return h_units, v_units, noise


def _stack(group, pieces):
  """One group's units from its leaves' ``pieces``, zero-padded to the group's size."""
  pad = group.size - group.units
  if pad:
    pieces = [*pieces, jnp.zeros((pad, *pieces[0].shape[1:]), pieces[0].dtype)]
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)


def _members(layout):
  """Per group, the indices of its leaves in storage order."""
  members = [[] for _ in layout.groups]
  for i, slot in enumerate(layout.slots):
    members[slot.group].append(i)
  return members


def _refit_group(group, factors, lips, precond, inputs, lr, first_step, cfg: KronConfig):
  """One fitting step of every unit of a group (one vmapped call), in float32 or wider:
  the new factors, Lipschitz estimates, (with ``cache_precond``) ``P_i`` of the stored
  factors, else ``()``, and (procrustes) the units' ``P h̃`` before the step, else None."""
  if 0 in group.block_shape:  # empty units: nothing to fit
    return factors, lips, precond, None
  h = _stack(group, [x[0] for x in inputs])
  v = None if inputs[0][1] is None else _stack(group, [x[1] for x in inputs])
  noise = _stack(group, [x[2] for x in inputs])
  wide = numerics.cast_factors(factors, group.dense, h.dtype)
  # Only procrustes uses P in its fit; triangular leaves the cache unread there.
  use_p = bool(precond) and cfg.fit.geometry != "triangular"
  old_p = numerics.cast_factors(precond, group.dense, h.dtype) if use_p else None

  p_axis, v_axis = 0 if use_p else None, None if v is None else 0
  if cfg.fit.auto_init:  # one cond per group: under vmap it would run every refit

    def rescale(f, p):
      return jax.vmap(numerics.auto_scale, in_axes=(0, 0, v_axis, p_axis))(f, h, v, p)

    wide, old_p = jax.lax.cond(first_step, rescale, lambda f, p: (f, p), wide, old_p)

  def fit(f, lp, p, hh, vv, nn):
    return numerics.fit_factors(f, lp, hh, vv, nn, lr, group.dense, cfg.fit, p)

  in_axes = (0, 0, p_axis, 0, v_axis, 0)
  new_f, new_l, preconditioned = jax.vmap(fit, in_axes=in_axes)(wide, lips, old_p, h, v, noise)
  numel = math.prod(group.block_shape)
  new_f = tuple(
      numerics.remove_asymmetry(q)
      if numerics.leaves_asymmetry(cfg.fit.geometry, is_dense, n, numel) else q
      for q, is_dense, n in zip(new_f, group.dense, group.block_shape, strict=True))
  stored = tuple(q.astype(o.dtype) for q, o in zip(new_f, factors, strict=True))
  if not precond:
    return stored, tuple(new_l), (), preconditioned
  # P of the factors as stored (rounded to precond_dtype), so Ps is a function of Qs.
  new_p = jax.vmap(lambda f: numerics.precond_factors(f, group.dense))(
      numerics.cast_factors(stored, group.dense, h.dtype))
  new_p = tuple(x.astype(o.dtype) for x, o in zip(new_p, precond, strict=True))
  return stored, tuple(new_l), new_p, preconditioned


def _refit(qs, ls, ps, key, fit_targets, params, obj_fn, layout, plans, lr, first_step, cfg):
  """Per group, after one fitting step: the new factors, Lipschitz estimates, cached ``P_i``,
  and the units' ``P h̃`` before the step (procrustes; else None)."""
  n = len(plans)
  keys = jax.random.split(key, 2 * n)
  targets, probes = _fitting_pairs(keys[n:], fit_targets, params, obj_fn, layout.treedef, cfg)
  noise = _noise(keys[:n], plans, targets, cfg.fit.geometry)
  inputs = [
      _unit_inputs(plan, h, v, damping_noise)
      for plan, h, v, damping_noise in zip(plans, targets, probes, noise, strict=True)
  ]
  out = [
      _refit_group(group, f, lp, p, [inputs[i] for i in idx], lr, first_step, cfg)
      for group, f, lp, p, idx in zip(layout.groups, qs, ls, ps, _members(layout), strict=True)
  ]
  return tuple([x[k] for x in out] for k in range(4))


def _precondition(qs, ps, m_hat, layout, plans):
  """Per group the units' ``P m̂`` (None for a group of empty units); from the cached ``P_i``
  (``ps``) where there are any, else from the factors."""
  out = []
  for group, factors, precond, idx in zip(layout.groups, qs, ps, _members(layout), strict=True):
    if 0 in group.block_shape:
      out.append(None)
      continue
    compute = _common.stats_dtype(m_hat[idx[0]].dtype)
    m = _stack(group, [planning.to_units(m_hat[i].astype(compute), plans[i]) for i in idx])

    def apply(f, x, dense=group.dense, cached=bool(precond)):
      wide = numerics.cast_factors(f, dense, x.dtype)
      if cached:
        return numerics.apply_precond(wide, x, dense)
      return numerics.precondition(wide, x, dense)

    out.append(jax.vmap(apply)(precond if precond else factors, m))
  return out


def _leaf_updates(units, grads, layout, plans, cfg: KronConfig):
  """Per group ``units`` (``P m̂``) clipped by RMS per unit, back in each leaf's shape and its
  gradient's dtype (zeros for empty leaves)."""
  out = [jnp.zeros_like(g) for g in grads]
  for u, idx in zip(units, _members(layout), strict=True):
    if u is None:
      continue
    u = jax.vmap(lambda x: numerics.clip_by_rms(x, cfg.update_clip))(u)
    for i in idx:
      slot = layout.slots[i]
      unit = u[slot.start:slot.start + slot.count]
      out[i] = planning.from_units(unit, plans[i]).astype(grads[i].dtype)
  return out


def _step(updates, state, params, obj_fn, layout, plans, cfg: KronConfig):
  """Momentum → refit decision → refit (inside one ``lax.cond``) → apply and clip.

  Whitening procrustes fitted on the momentum (the default) gets ``P m̂`` from the fit itself on
  refit steps: its fitting pair is ``P`` (before the step) applied to the damped ``m̂``, which
  differs from ``m̂`` by ``damping · RMS(m̂)`` random signs and float round-off (Li's psgd_torch
  whitening steps likewise return the ``P g`` they fitted on). This saves one application of
  ``P`` per refit.
  """
  count_inc = optax.safe_increment(state.count)
  grads = jax.tree.leaves(updates)
  m_hat, new_mu = _momentum(updates, state.mu, count_inc, cfg)
  do_refit, new_acc = _refit_decision(state.count, state.precond_acc, cfg)
  key, refit_key = jax.random.split(jax.random.wrap_key_data(state.key))
  lr = jnp.asarray(_common.schedule_value(cfg.precond_lr, state.count), jnp.float32)
  fit_targets = m_hat if cfg.fit_on == "momentum" else grads
  if not layout.groups:  # no leaves: nothing to fit or apply
    return updates, state._replace(count=count_inc, key=jax.random.key_data(key),
                                   precond_acc=new_acc, mu=new_mu)
  qs = [_common.as_tuple(g) for g in state.Qs.groups]
  ls = [_common.as_tuple(g) for g in state.Ls.groups]
  if cfg.cache_precond:
    ps = [_common.as_tuple(g) for g in state.Ps.groups]
  else:
    ps = [()] * len(layout.groups)

  update_from_fit = (cfg.criterion != "newton" and cfg.fit_on == "momentum"
                     and cfg.fit.geometry != "triangular")

  def refit(qs, ls, ps):
    qs, ls, ps, fitted = _refit(qs, ls, ps, refit_key, fit_targets, params, obj_fn, layout,
                                plans, lr, state.count == 0, cfg)
    units = fitted if update_from_fit else _precondition(qs, ps, m_hat, layout, plans)
    return qs, ls, ps, units

  def apply_only(qs, ls, ps):
    return qs, ls, ps, _precondition(qs, ps, m_hat, layout, plans)

  if cfg.refits_every_step:
    qs, ls, ps, units = refit(qs, ls, ps)  # no conditional (XLA runs it faster unwrapped)
  else:
    qs, ls, ps, units = jax.lax.cond(do_refit, refit, apply_only, qs, ls, ps)
  out = _leaf_updates(units, grads, layout, plans, cfg)
  new_state = KronState(
      count=count_inc,
      key=jax.random.key_data(key),
      precond_acc=new_acc,
      mu=new_mu,
      Qs=FactorGroups(qs, layout),
      Ls=FactorGroups(ls, layout),
      Ps=FactorGroups(ps, layout) if cfg.cache_precond else (),
  )
  return layout.treedef.unflatten(out), new_state


def update(updates, state, params, obj_fn, cfg: KronConfig):
  """``(updates, new KronState)`` after checking the inputs against the state's plans."""
  layout, plans = check_inputs(updates, state, params, obj_fn, cfg)
  if any(_common.explicit_spec(g) is not None for g in jax.tree.leaves(updates)):
    # Explicit-axes mesh: run the step with the mesh axes switched to Auto, so XLA's SPMD
    # partitioner places the contractions (as under an Auto mesh: partial products and
    # all-reduces, no gather of a whole leaf), and hand back the inputs' explicit shardings.
    # Inside, no array carries explicit axes, so the step's math needs no sharding names.
    typeof = lambda tree: jax.tree.map(lambda x: jax.typeof(x).sharding, tree)  # noqa: E731
    step = jax.sharding.auto_axes(
        lambda u, s, p: _step(u, s, p, obj_fn, layout, plans, cfg),
        out_sharding=(typeof(updates), typeof(state)),
    )
    return step(updates, state, params)
  return _step(updates, state, params, obj_fn, layout, plans, cfg)
