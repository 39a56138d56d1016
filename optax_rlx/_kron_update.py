"""One Kron step on plain arrays: momentum → refit decision → refit → apply ``P`` and clip.

The fitting and applying of each unit is :mod:`optax_rlx._kron_numerics`; this module wires the
leaves, layers and blocks to it (``jax.vmap`` over a plan's leading axis) and builds the new state.
"""

import jax
import jax.numpy as jnp
import optax

from optax_rlx import _common
from optax_rlx import _kron_numerics as numerics
from optax_rlx import _kron_plan as planning
from optax_rlx._kron_config import KronConfig
from optax_rlx._kron_state import KronState, check_inputs


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


def _refit_leaf(plan, factors, lips, h, v, key, lr, first_step, cfg: KronConfig):
  """One fitting step of every unit (layer, block) of a leaf, in float32 or wider."""
  if h.size == 0:  # an empty leaf has nothing to fit
    return factors, lips
  compute = _common.stats_dtype(h.dtype)
  h_inner = planning.to_inner(h.astype(compute), plan)
  v_inner = None if v is None else planning.to_inner(v.astype(compute), plan)
  noise = jax.random.normal(key, plan.lead + plan.block_shape, compute)
  wide = numerics.cast_factors(factors, plan.dense, compute)

  def fit(f, lp, hh, vv, nn):
    return numerics.fit_factors(f, lp, hh, vv, nn, lr, first_step, plan.dense, cfg.fit)

  in_axes = (0, 0, 0, None if v_inner is None else 0, 0)
  fit = jax.vmap(fit, in_axes=in_axes) if plan.batched else fit
  new_f, new_l = fit(wide, lips, h_inner, v_inner, noise)
  return tuple(q.astype(old.dtype) for q, old in zip(new_f, factors, strict=True)), tuple(new_l)


def _refit(qs, ls, key, fit_targets, params, obj_fn, plans, treedef, lr, first_step, cfg):
  """New ``(factors, Lipschitz estimates)`` per leaf after one fitting step."""
  n = len(plans)
  keys = jax.random.split(key, 2 * n)
  targets, probes = _fitting_pairs(keys[n:], fit_targets, params, obj_fn, treedef, cfg)
  per_leaf = [
      _refit_leaf(plan, f, lp, h, v, k, lr, first_step, cfg)
      for plan, f, lp, h, v, k in zip(plans, qs, ls, targets, probes, keys[:n], strict=True)
  ]
  return [f for f, _ in per_leaf], [lp for _, lp in per_leaf]


def _apply_leaf(plan, factors, m, g, cfg: KronConfig):
  """``P m̂`` clipped by RMS per unit, back in the leaf's shape and the gradient's dtype."""
  if g.size == 0:
    return jnp.zeros_like(g)
  compute = _common.stats_dtype(m.dtype)

  def apply(f, x):
    u = numerics.precondition(numerics.cast_factors(f, plan.dense, compute), x, plan.dense)
    return numerics.clip_by_rms(u, cfg.update_clip)

  apply = jax.vmap(apply) if plan.batched else apply
  u = apply(factors, planning.to_inner(m.astype(compute), plan))
  return planning.from_inner(u, plan).astype(g.dtype)


def _step(updates, state, params, obj_fn, plans, treedef, cfg: KronConfig):
  """Momentum → refit decision → refit (inside one ``lax.cond``) → apply and clip."""
  count_inc = optax.safe_increment(state.count)
  grads = jax.tree.leaves(updates)
  m_hat, new_mu = _momentum(updates, state.mu, count_inc, cfg)
  do_refit, new_acc = _refit_decision(state.count, state.precond_acc, cfg)
  key, refit_key = jax.random.split(jax.random.wrap_key_data(state.key))
  lr = jnp.asarray(_common.schedule_value(cfg.precond_lr, state.count), jnp.float32)
  fit_targets = m_hat if cfg.fit_on == "momentum" else grads
  qs = [_common.as_tuple(f) for f in treedef.flatten_up_to(state.Qs)]
  ls = [_common.as_tuple(f) for f in treedef.flatten_up_to(state.Ls)]

  def refit(qs, ls):
    return _refit(qs, ls, refit_key, fit_targets, params, obj_fn, plans, treedef, lr,
                  state.count == 0, cfg)

  if cfg.refits_every_step:
    qs, ls = refit(qs, ls)  # no conditional (XLA runs it faster unwrapped)
  else:
    qs, ls = jax.lax.cond(do_refit, refit, lambda q, lips: (q, lips), qs, ls)
  out = [
      _apply_leaf(plan, f, m, g, cfg) for plan, f, m, g in zip(plans, qs, m_hat, grads, strict=True)
  ]
  new_state = KronState(
      count=count_inc,
      key=jax.random.key_data(key),
      precond_acc=new_acc,
      mu=new_mu,
      Qs=treedef.unflatten(qs),
      Ls=treedef.unflatten(ls),
  )
  return treedef.unflatten(out), new_state


def update(updates, state, params, obj_fn, cfg: KronConfig):
  """``(updates, new KronState)`` after checking the inputs against the state's plans."""
  plans, treedef = check_inputs(updates, state, params, obj_fn, cfg)
  if any(_common.explicit_spec(g) is not None for g in jax.tree.leaves(updates)):
    # Explicit-axes mesh: run the step with the mesh axes switched to Auto, so XLA's SPMD
    # partitioner places the contractions (as under an Auto mesh: partial products and
    # all-reduces, no gather of a whole leaf), and hand back the inputs' explicit shardings.
    # Inside, no array carries explicit axes, so the step's math needs no sharding names.
    typeof = lambda tree: jax.tree.map(lambda x: jax.typeof(x).sharding, tree)  # noqa: E731
    step = jax.sharding.auto_axes(
        lambda u, s, p: _step(u, s, p, obj_fn, plans, treedef, cfg),
        out_sharding=(typeof(updates), typeof(state)),
    )
    return step(updates, state, params)
  return _step(updates, state, params, obj_fn, plans, treedef, cfg)
