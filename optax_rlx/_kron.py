"""Kron-PSGD: preconditioned SGD with a Kronecker-factored preconditioner fitted on a Lie group.

Options → ``KronConfig`` (``_kron_config``); ``init`` lays out factors by each leaf's ``LeafPlan``
(``_kron_plan``); ``update`` = momentum → refit decision → refit (``_kron_numerics``) → apply.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_rlx import _common
from optax_rlx import _kron_numerics as numerics
from optax_rlx import _kron_plan as planning
from optax_rlx._kron_config import OWNER, KronConfig, make_config


class KronState(NamedTuple):
  """State of :func:`scale_by_kron`.

  For a leaf of shape ``(d_1, ..., d_r)`` the preconditioner is ``P = Qᵀ Q`` with
  ``Q = Q_1 ⊗ ... ⊗ Q_r``: ``Q_i`` is a dense ``(d_i, d_i)`` matrix (upper triangular, or
  symmetric positive definite with ``geometry='procrustes'``) or a diagonal stored as ``(d_i,)``.
  Scalars have one factor of shape ``(1,)``. A stacked leaf (``stacked_layers``) of shape
  ``(n, d_1, ..., d_r)`` has factors with a leading ``n`` axis.

  Attributes:
    count: int32 scalar, number of updates so far.
    key: uint32 PRNG key data (``jax.random.key_data``), split every step.
    precond_acc: float32 scalar, running sum of refit probabilities; a refit happens whenever it
      reaches 1 (a deterministic realisation of ``precond_update_prob``).
    mu: pytree like the params, momentum in ``mu_dtype``; ``()`` without momentum.
    Qs: pytree with the params' structure whose leaves are tuples of factors in ``precond_dtype``.
    Ls: like ``Qs`` with float32 scalars (``(n,)`` when stacked): each factor's Lipschitz
      estimate normalising its fitting step.
  """

  count: jax.Array
  key: jax.Array
  precond_acc: jax.Array
  mu: optax.Updates
  Qs: Any
  Ls: Any


# ---------------------------------------------------------------------------------------------
# Plans and the state's layout.
# ---------------------------------------------------------------------------------------------


def _leaf_plans(tree, cfg: KronConfig) -> list[planning.LeafPlan]:
  """One plan per leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if cfg.stacked_layers is None:
    stacked = [False] * len(leaves)
  else:
    stacked = jax.tree.leaves(_common.resolve_mask(cfg.stacked_layers, tree))
  return [
      planning.make_plan(tuple(x.shape), bool(s), cfg.structure, _common.path_str(path))
      for (path, x), s in zip(leaves, stacked, strict=True)
  ]


def _init_leaf(param, plan, cfg: KronConfig):
  """Factors ``s^(1/r) I`` (dense) or ``s^(1/r) 1`` (diagonal), zero Lipschitz estimates."""
  dtype = cfg.factor_dtype(param.dtype)
  scale = 1.0 if cfg.init_scale is None else cfg.init_scale
  per_factor = jnp.asarray(scale, jnp.float32) ** (1.0 / len(plan.block_shape))
  factors = tuple(
      (per_factor * (jnp.eye(d) if is_dense else jnp.ones(d))).astype(dtype)
      for d, is_dense in zip(plan.block_shape, plan.dense, strict=True)
  )
  lips = tuple(jnp.zeros([], jnp.float32) for _ in plan.block_shape)
  if not plan.batched:
    return factors, lips
  # One set of factors per layer and block. A layer's factors live with that layer: under an
  # explicit-axes mesh they take the param's sharding of the layer axis (see state_sharding for
  # Auto meshes); blocks' factors are replicated.
  n = plan.lead[0]
  lay_out = (
      functools.partial(_common.layout_like, param=param, lead=True)
      if plan.stacked and not plan.blocked else lambda x: x
  )
  factors = tuple(lay_out(jnp.broadcast_to(q, (n, *q.shape))) for q in factors)
  lips = tuple(lay_out(jnp.zeros((n,), jnp.float32)) for _ in lips)
  return factors, lips


def _init(params, cfg: KronConfig) -> KronState:
  _common.check_real_float_leaves(OWNER, params, "params")
  mu = _common.momentum_like(params, cfg.mu_dtype) if cfg.use_momentum else ()
  params, _ = _common.split_variables(params)  # factors never take a param's NNX metadata
  treedef = jax.tree.structure(params)
  per_leaf = [
      _init_leaf(p, plan, cfg)
      for p, plan in zip(jax.tree.leaves(params), _leaf_plans(params, cfg), strict=True)
  ]
  return KronState(
      count=jnp.zeros([], jnp.int32),
      key=jnp.asarray(cfg.key_data),
      precond_acc=jnp.ones([], jnp.float32),
      mu=mu,
      Qs=treedef.unflatten([factors for factors, _ in per_leaf]),
      Ls=treedef.unflatten([lips for _, lips in per_leaf]),
  )


# ---------------------------------------------------------------------------------------------
# update: checks, then momentum → refit decision → refit → apply and clip.
# ---------------------------------------------------------------------------------------------


def _check_inputs(updates, state, params, obj_fn, cfg: KronConfig):
  """Raises ``ValueError`` for a foreign state, mismatched trees or shapes, or missing Newton
  inputs; returns the leaves' plans and the updates' treedef."""
  if not isinstance(state, KronState):
    raise ValueError(f"{OWNER}: expected a KronState, got {type(state).__name__}.")
  _common.check_real_float_leaves(OWNER, updates, "the updates")
  treedef = jax.tree.structure(updates)
  try:
    qs = [_common.as_tuple(f) for f in treedef.flatten_up_to(state.Qs)]
  except (ValueError, TypeError):
    _common.check_same_structure(
        OWNER, jax.tree.map(lambda _: 0, state.Qs, is_leaf=lambda x: isinstance(x, tuple)),
        "the optimizer state", updates, "the updates",
    )
    raise
  if params is not None:
    _common.check_same_shapes(OWNER, params, "the params", updates, "the updates")
  plans = _leaf_plans(updates, cfg)
  for (path, _), plan, factors in zip(
      jax.tree_util.tree_flatten_with_path(updates)[0], plans, qs, strict=True
  ):
    planning.check_factor_shapes(plan, tuple(tuple(q.shape) for q in factors),
                                 _common.path_str(path))
  if cfg.criterion == "newton":
    if obj_fn is None:
      raise ValueError(
          f"{OWNER}: criterion='newton' needs `obj_fn` (params -> scalar loss) passed to "
          f"`update(grads, state, params, obj_fn=...)`."
      )
    if params is None:
      raise ValueError(f"{OWNER}: criterion='newton' needs `params` passed to `update`.")
  return plans, treedef


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
  return jax.tree.leaves(hvp), probes


def _refit_leaf(plan, factors, lips, h, v, key, lr, first_step, cfg: KronConfig):
  """One fitting step of every unit (layer, block) of a leaf, in float32 or wider."""
  if h.size == 0:  # an empty leaf has nothing to fit
    return factors, lips
  compute = _common.stats_dtype(h.dtype)
  h_inner = planning.to_inner(h.astype(compute), plan)
  v_inner = None if v is None else planning.to_inner(v.astype(compute), plan)
  noise = jax.random.normal(key, plan.lead + plan.block_shape, compute)
  wide = tuple(q.astype(compute) for q in factors)

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
    u = numerics.precondition(tuple(q.astype(compute) for q in f), x, plan.dense)
    return numerics.clip_by_rms(u, cfg.update_clip)

  apply = jax.vmap(apply) if plan.batched else apply
  u = apply(factors, planning.to_inner(m.astype(compute), plan))
  return planning.from_inner(u, plan).astype(g.dtype)


def _update_step(updates, state, params, obj_fn, plans, treedef, cfg: KronConfig):
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


def _update_arrays(updates, state, params, obj_fn, cfg: KronConfig):
  plans, treedef = _check_inputs(updates, state, params, obj_fn, cfg)
  if any(_common.explicit_spec(g) is not None for g in jax.tree.leaves(updates)):
    # Explicit-axes mesh: run the step with the mesh axes switched to Auto, so XLA's SPMD
    # partitioner places the contractions (as under an Auto mesh: partial products and
    # all-reduces, no gather of a whole leaf), and hand back the inputs' explicit shardings.
    # Inside, no array carries explicit axes, so the step's math needs no sharding names.
    typeof = lambda tree: jax.tree.map(lambda x: jax.typeof(x).sharding, tree)  # noqa: E731
    step = jax.sharding.auto_axes(
        lambda u, s, p: _update_step(u, s, p, obj_fn, plans, treedef, cfg),
        out_sharding=(typeof(updates), typeof(state)),
    )
    return step(updates, state, params)
  return _update_step(updates, state, params, obj_fn, plans, treedef, cfg)


def _update(updates, state, params, obj_fn, cfg: KronConfig):
  """The update on plain arrays: NNX Variables (trees from ``nnx.state``) are unwrapped and the
  results put back in them."""
  updates, rewrap_updates = _common.split_variables(updates)
  rewrap_mu = lambda tree: tree  # noqa: E731
  if isinstance(state, KronState):
    mu, rewrap_mu = _common.split_variables(state.mu)
    state = state._replace(mu=mu)
  if params is not None:
    params, rewrap_params = _common.split_variables(params)
    if obj_fn is not None:
      user_obj_fn = obj_fn
      obj_fn = lambda p: user_obj_fn(rewrap_params(p))  # noqa: E731
  out, new_state = _update_arrays(updates, state, params, obj_fn, cfg)
  return rewrap_updates(out), new_state._replace(mu=rewrap_mu(new_state.mu))


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def scale_by_kron(
    b1: float | None = 0.9,
    nesterov: bool = False,
    precond_lr: optax.ScalarOrSchedule = 0.1,
    precond_update_prob: optax.ScalarOrSchedule | None = None,
    precond_init_scale: float | None = None,
    criterion: str = "whitening",
    geometry: str = "procrustes",
    precond_fit_on: str = "momentum",
    max_size_dense: int | None = None,
    min_ndim_dense: int | None = None,
    max_skew_dense: float | None = None,
    memory_save_mode: str | None = None,
    block_size: int | None = None,
    damping: float = 1e-9,
    lipschitz_decay: float = 0.9,
    update_clip: float | None = 1.1,
    mu_dtype: Any = None,
    precond_dtype: Any = None,
    stacked_layers: Any = None,
    key: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions updates with Li's Kronecker-factored PSGD preconditioner.

  For each leaf (any rank) the preconditioner is :math:`P = Q^\top Q` with
  :math:`Q = Q_1 \otimes \dots \otimes Q_r`, one factor per axis. With :math:`t` the 1-based step:

  .. math::

    m_t &= b_1 m_{t-1} + (1 - b_1) g_t, \qquad \hat m_t = m_t / (1 - b_1^t) \\
    u_t &= P_t \hat m_t \,/\, \max(1, \mathrm{RMS}(P_t \hat m_t) / \texttt{update\_clip})

  :math:`Q` is fitted online, on a fraction ``precond_update_prob`` of the steps, by a Lie-group
  gradient step on :math:`E[h^\top P h + v^\top P^{-1} v]` over pairs :math:`(v, h)`:

  * ``criterion='whitening'``: :math:`h = \hat m_t` (or :math:`g_t`, ``precond_fit_on``) and
    :math:`v \sim N(0, I)` independent of it; the fixed point is
    :math:`P = E[h h^\top]^{-1/2}` (Kronecker approximation), so :math:`P \hat m` has RMS ≈ 1.
  * ``criterion='newton'``: :math:`v \sim N(0, I)` and :math:`h = H v`, a Hessian-vector product
    of ``obj_fn`` (passed to ``update``); the fixed point is :math:`P = |H|^{-1}`.

  :math:`h` is damped to :math:`h + (\texttt{damping} + \epsilon |h|)\,n`, :math:`n \sim N(0, I)`,
  so :math:`P \preceq I/\texttt{damping}` and zero gradients cannot produce 0/0. With
  :math:`A = Q h`, :math:`B = Q^{-\top} v` and :math:`\mathrm{term}_{1,i}, \mathrm{term}_{2,i}`
  their Gram matrices along axis :math:`i` (all other axes contracted), each factor takes a step
  of size :math:`\mu / L_i` (``precond_lr`` :math:`\mu`), where
  :math:`L_i \leftarrow \max(\beta_L L_i + (1 - \beta_L) \ell_i, \ell_i)` (``lipschitz_decay``
  :math:`\beta_L`) and :math:`\ell_i` is a lower bound of the spectral norm of
  :math:`\mathrm{term}_{1,i} + \mathrm{term}_{2,i}`:

  * ``geometry='triangular'`` (Li 2019, upper-triangular Lie group):
    :math:`Q_i \leftarrow Q_i - \tfrac{\mu}{L_i} \mathrm{triu}(\mathrm{term}_{1,i} -
    \mathrm{term}_{2,i})\, Q_i`, with triangular solves for :math:`B`.
  * ``geometry='procrustes'`` (Li 2024, "Q0.5EQ1.5"): :math:`A = P h`, :math:`\mathrm{term}_{2,i}`
    integrated out analytically for whitening, :math:`Q_i \leftarrow Q_i - \tfrac{\mu}{L_i}
    (\mathrm{term}_{1,i} - \mathrm{term}_{2,i}) Q_i` followed by a small orthogonal rotation that
    keeps :math:`Q_i` symmetric positive definite. Matmuls only, no solves.
  * Diagonal factors: :math:`q_i \leftarrow q_i (1 - \tfrac{\mu}{L_i}(\mathrm{diag\,term}_{1,i} -
    \mathrm{diag\,term}_{2,i}))`.

  After each fit the factors are rebalanced to equal max-abs. Which factors are dense: an axis
  gets a diagonal factor when its size is 1, above ``max_size_dense``, when the tensor has fewer
  than ``min_ndim_dense`` axes, when ``size² > max_skew_dense · numel`` (e.g. the vocabulary axis
  of an embedding, or the wide axis of any non-square matrix at the default 1.0), or by
  ``memory_save_mode``. Vectors get a diagonal ``Q`` and scalars a scalar one.

  Non-finite gradients propagate into the momentum, the factors and the update (the step is
  visibly NaN, never silently wrong); wrap the optimizer in ``optax.apply_if_finite`` to skip such
  steps and keep the state clean.

  The refit schedule is deterministic: the probabilities are summed from the step count and the
  preconditioner is refitted whenever the sum reaches an integer (identical on every device),
  inside one top-level ``lax.cond`` that does no fitting work on other steps.

  Args:
    b1: momentum :math:`b_1` in [0, 1); 0 or None for none.
    nesterov: use Nesterov momentum.
    precond_lr: :math:`\mu`, float or schedule of the step count.
    precond_update_prob: probability of refitting :math:`Q` per step, float in (0, 1] or a
      schedule; None means :func:`precond_update_prob_schedule` (1 for 500 steps, then → 0.03).
    precond_init_scale: initial :math:`Q = s I`; None sets :math:`s` from the first fitting pair
      (``(mean h⁴ / mean v⁴)^(-1/8)`` per leaf, 1 for zero or non-finite gradients).
    criterion: ``'whitening'`` or ``'newton'``.
    geometry: ``'procrustes'`` (default) or ``'triangular'``.
    precond_fit_on: whitening target: ``'momentum'`` (:math:`\hat m_t`) or ``'gradient'``.
    max_size_dense: largest axis with a dense factor; None means 8192.
    min_ndim_dense: tensors with fewer axes get only diagonal factors; None means 2.
    max_skew_dense: an axis is diagonal when ``size² > max_skew_dense · numel``; None means 1.0.
      Pass ``float('inf')`` to disable.
    memory_save_mode: None, ``'one_diag'`` (largest axis diagonal) or ``'all_diag'``.
    block_size: None (default) keeps every axis whole. An int partitions each axis longer than
      ``block_size`` into the fewest equal blocks no longer than it (``d / n`` for the smallest
      ``n >= d / block_size`` dividing ``d``; 12288 with 4096 → 3 blocks of 4096, 50257 → 29 of
      1733). Every block of the leaf gets its own factors, fitted and applied independently (one
      vmapped batch with the layers of a stacked leaf), so memory and time per leaf are bounded
      by the block size. The rules above then apply to the block's shape. An axis whose length
      has no divisor near ``d / block_size`` (a prime) falls back to small blocks.
    damping: the constant damping of the fitting target (>= 0).
    lipschitz_decay: :math:`\beta_L` in [0, 1).
    update_clip: largest RMS of a preconditioned update per tensor (per layer when stacked, per
      block with ``block_size``); None disables the clip.
    mu_dtype: momentum dtype; None means the gradient's.
    precond_dtype: dtype of the factors (bfloat16 works); None means float32 (float64 for
      float64 params). Gram terms, norms and solves always run in float32 or wider.
    stacked_layers: pytree of bools (prefix of the params, or a callable of them): True where a
      leaf's leading axis stacks layers (``nn.scan``); each layer gets its own factors (vmapped).
    key: int seed or JAX PRNG key for the probes; stored in the state and split every step.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is :class:`KronState`. Its
    ``update(updates, state, params=None, *, obj_fn=None, **extra_args)`` needs ``params`` and
    ``obj_fn`` (params -> scalar loss) with ``criterion='newton'``.

  References:
    Li, `Preconditioned Stochastic Gradient Descent <https://arxiv.org/abs/1512.04202>`_, 2018.

    Li, `Preconditioner on Matrix Lie Group for SGD <https://arxiv.org/abs/1809.10232>`_, 2019.

    Li, `Stochastic Hessian Fittings with Lie Groups <https://arxiv.org/abs/2402.11858>`_, 2024.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_rlx
    >>> tx = optax_rlx.scale_by_kron(key=0)
    >>> params = {'w': jnp.zeros((4, 4)), 'emb': jnp.zeros((64, 8)), 'b': jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> [[q.shape for q in state.Qs[k]] for k in ('w', 'emb', 'b')]  # 64² > 64·8: diagonal
    [[(4, 4), (4, 4)], [(64,), (8, 8)], [(3,)]]
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state)
    >>> updates['emb'].shape, int(state.count)
    ((64, 8), 1)
  """
  cfg = make_config(
      b1=b1,
      nesterov=nesterov,
      precond_lr=precond_lr,
      precond_update_prob=precond_update_prob,
      precond_init_scale=precond_init_scale,
      criterion=criterion,
      geometry=geometry,
      precond_fit_on=precond_fit_on,
      max_size_dense=max_size_dense,
      min_ndim_dense=min_ndim_dense,
      max_skew_dense=max_skew_dense,
      memory_save_mode=memory_save_mode,
      block_size=block_size,
      damping=damping,
      lipschitz_decay=lipschitz_decay,
      update_clip=update_clip,
      mu_dtype=mu_dtype,
      precond_dtype=precond_dtype,
      stacked_layers=stacked_layers,
      key=key,
  )

  def init_fn(params):
    return _init(params, cfg)

  def update_fn(updates, state, params=None, obj_fn=None, **extra_args):
    del extra_args
    return _update(updates, state, params, obj_fn, cfg)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kron(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | None = 0.9,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    nesterov: bool = False,
    precond_lr: optax.ScalarOrSchedule = 0.1,
    precond_update_prob: optax.ScalarOrSchedule | None = None,
    precond_init_scale: float | None = None,
    criterion: str = "whitening",
    geometry: str = "procrustes",
    precond_fit_on: str = "momentum",
    max_size_dense: int | None = None,
    min_ndim_dense: int | None = None,
    max_skew_dense: float | None = None,
    memory_save_mode: str | None = None,
    block_size: int | None = None,
    damping: float = 1e-9,
    lipschitz_decay: float = 0.9,
    update_clip: float | None = 1.1,
    mu_dtype: Any = None,
    precond_dtype: Any = None,
    stacked_layers: Any = None,
    key: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""The Kron-PSGD optimizer: :func:`scale_by_kron`, decoupled weight decay, learning rate.

  .. math::

    \theta_t = \theta_{t-1} - \eta_t\,(u_t + \lambda\,\theta_{t-1})

  with :math:`u_t` the clipped preconditioned momentum of :func:`scale_by_kron`,
  :math:`\eta_t` = ``learning_rate`` (float or schedule) and :math:`\lambda` = ``weight_decay``
  applied where ``weight_decay_mask`` is True (everywhere when None). Whitened updates have
  RMS ≈ 1, so learning rates are of the order of Adam's (1e-4 to 1e-2).

  Args:
    learning_rate: :math:`\eta_t`, float or optax schedule.
    b1: momentum, see :func:`scale_by_kron`.
    weight_decay: :math:`\lambda` >= 0.
    weight_decay_mask: pytree of bools (prefix of the params) or a callable of the params.
    nesterov: see :func:`scale_by_kron`.
    precond_lr: see :func:`scale_by_kron`.
    precond_update_prob: see :func:`scale_by_kron`.
    precond_init_scale: see :func:`scale_by_kron`.
    criterion: see :func:`scale_by_kron`.
    geometry: see :func:`scale_by_kron`.
    precond_fit_on: see :func:`scale_by_kron`.
    max_size_dense: see :func:`scale_by_kron`.
    min_ndim_dense: see :func:`scale_by_kron`.
    max_skew_dense: see :func:`scale_by_kron`.
    memory_save_mode: see :func:`scale_by_kron`.
    block_size: see :func:`scale_by_kron`.
    damping: see :func:`scale_by_kron`.
    lipschitz_decay: see :func:`scale_by_kron`.
    update_clip: see :func:`scale_by_kron`.
    mu_dtype: see :func:`scale_by_kron`.
    precond_dtype: see :func:`scale_by_kron`.
    stacked_layers: see :func:`scale_by_kron` (list it in ``static_args`` of
      ``optax.inject_hyperparams`` when it is a callable).
    key: see :func:`scale_by_kron`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; pass ``obj_fn`` to ``update`` with
    ``criterion='newton'``.

  References:
    Li, `Preconditioned Stochastic Gradient Descent <https://arxiv.org/abs/1512.04202>`_, 2018.

    Li, `Stochastic Hessian Fittings with Lie Groups <https://arxiv.org/abs/2402.11858>`_, 2024.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_rlx
    >>> rotation = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (8, 8)))[0]
    >>> A = jnp.logspace(0, 2, 8)[:, None] * rotation  # AᵀA: condition 1e4, not diagonal
    >>> def loss(w):
    ...   return 0.5 * jnp.sum((A @ w - jnp.eye(8)) ** 2)
    >>> tx = optax_rlx.kron(optax.cosine_decay_schedule(0.1, 500), key=0)
    >>> @jax.jit
    ... def step(w, state):
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w)
    ...   return optax.apply_updates(w, updates), state
    >>> w = jnp.zeros((8, 8))
    >>> state = tx.init(w)
    >>> for _ in range(500):
    ...   w, state = step(w, state)
    >>> print(f"{loss(jnp.zeros((8, 8))):.1f}", bool(loss(w) < 1e-3))  # optax.adam: 0.13
    4.0 True
  """
  _common.check_number(OWNER, "learning_rate", learning_rate, low=0.0, allow_schedule=True)
  _common.check_number(OWNER, "weight_decay", weight_decay, low=0.0)
  chain = [
      scale_by_kron(
          b1=b1,
          nesterov=nesterov,
          precond_lr=precond_lr,
          precond_update_prob=precond_update_prob,
          precond_init_scale=precond_init_scale,
          criterion=criterion,
          geometry=geometry,
          precond_fit_on=precond_fit_on,
          max_size_dense=max_size_dense,
          min_ndim_dense=min_ndim_dense,
          max_skew_dense=max_skew_dense,
          memory_save_mode=memory_save_mode,
          block_size=block_size,
          damping=damping,
          lipschitz_decay=lipschitz_decay,
          update_clip=update_clip,
          mu_dtype=mu_dtype,
          precond_dtype=precond_dtype,
          stacked_layers=stacked_layers,
          key=key,
      )
  ]
  if not _common.is_zero(weight_decay):
    chain.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
  chain.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*chain)
