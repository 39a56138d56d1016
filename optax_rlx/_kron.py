"""Kron-PSGD: preconditioned SGD with a Kronecker-factored preconditioner fitted on a Lie group.

This module is the public transform, its alias and the per-leaf view of the state. The rooms
behind it: the options (``_kron_options``), the static plan on shapes (``_kron_plan``), the state
and its checks (``_kron_state``), one step on arrays (``_kron_update``), the geometries and the
fit of one unit (``_kron_geometry``), and the shared numerics (``_kron_numerics``).
"""

from collections.abc import Callable, Mapping
from typing import Any, Unpack

import jax
import optax

from optax_rlx import _common, _kron_update, _variables
from optax_rlx._kron_options import OWNER, KronOptions, make_config, takes_options
from optax_rlx._kron_state import KronState, by_leaf, init_state, tree_layout

__all__ = ["KronState", "fill_masked", "kron", "kron_by_leaf", "scale_by_kron"]


@takes_options
def scale_by_kron(**options: Unpack[KronOptions]) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions updates with Li's Kronecker-factored PSGD preconditioner.

  For each leaf (any rank) the preconditioner is :math:`P = Q^\top Q` with
  :math:`Q = Q_1 \otimes \dots \otimes Q_r`, one factor per axis. With :math:`t` the 1-based step:

  .. math::

    m_t &= b_1 m_{t-1} + (1 - b_1) g_t, \qquad \hat m_t = m_t / (1 - b_1^t) \\
    u_t &= P_t \hat m_t \,/\, \max(1, \mathrm{RMS}(P_t \hat m_t) / \mathtt{update\_clip})

  :math:`Q` is fitted online, on a fraction ``precond_update_prob`` of the steps, by a Lie-group
  gradient step on :math:`E[h^\top P h + v^\top P^{-1} v]` over pairs :math:`(v, h)`:

  * ``criterion='whitening'``: :math:`h = \hat m_t` (or :math:`g_t`, ``precond_fit_on``) and
    :math:`v \sim N(0, I)` independent of it; the fixed point is
    :math:`P = E[h h^\top]^{-1/2}` (Kronecker approximation), so :math:`P \hat m` has RMS ≈ 1.
  * ``criterion='newton'``: :math:`v \sim N(0, I)` and :math:`h = H v`, a Hessian-vector product
    of ``obj_fn`` (passed to ``update``); the fixed point is :math:`P = |H|^{-1}`.

  :math:`h` is damped to :math:`h + (\texttt{damping}\cdot\mathrm{RMS}(h) + \epsilon |h|)\,n`,
  :math:`n` random signs (Rademacher: :math:`E[n n^\top] = I` at a 32nd of the random bits of
  :math:`N(0, I)`; ``geometry='triangular'``, whose whitening fit also uses :math:`n` as the probe
  :math:`v`, draws :math:`N(0, I)`) and ``damping`` alone where :math:`h = 0`, so
  :math:`P \preceq I/(\texttt{damping}\cdot\mathrm{RMS}(h))` and zero gradients cannot produce
  0/0. The damping is relative, and every scale-dependent quantity (initial scale, Gram terms,
  Lipschitz estimates, RMS clip) is computed on tensors divided by exact powers of two, so the
  whole step is scale-free in float32: gradients scaled by :math:`10^{-30} \dots 10^{30}` give
  the same update direction and finite state (tested). With
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
  * ``geometry='quad'`` (Li's "QUAD", ``psgd_torch`` 2025): the procrustes pair, and with
    :math:`E_i = \mathrm{term}_{1,i} - \mathrm{term}_{2,i}`, :math:`a = \mu / (2 L_i)`:
    :math:`Q_i \leftarrow (I - a E_i) Q_i (I - a E_i)`, symmetrised: a congruence, so
    :math:`Q_i` stays symmetric positive definite without a rotation (two matmuls a step).
  * Diagonal factors: :math:`q_i \leftarrow q_i (1 - \tfrac{\mu}{L_i}(\mathrm{diag\,term}_{1,i} -
    \mathrm{diag\,term}_{2,i}))`.

  After each fit the factors are rebalanced to equal max-abs. Which factors are dense: an axis
  gets a diagonal factor when its size is 1, above ``max_size_dense``, when the tensor has fewer
  than ``min_ndim_dense`` axes, or by ``memory_save_mode``. Otherwise it is dense when
  ``size² <= max_skew_dense · numel`` (at the default 2.0 every matrix up to 2:1 is dense on
  both sides), and a longer, *skewed* axis (a fused ``(d, 3d)`` attention projection, a 4x MLP
  axis, a vocabulary) is dense while all dense factors of the tree together hold at most
  ``dense_budget`` times the params' entries: skewed axes are admitted least skewed first, each
  class of equal unit shape and axis whole or not at all, so equal layers get equal factors.
  With the default budget 1.0 the state stays about Adam's (momentum plus at most the params'
  size in dense factors) unless the matrices up to 2:1 alone need more. Vectors get a diagonal
  ``Q`` and scalars a scalar one.

  Complex parameters (complex64, complex128) follow optax's convention: pass the conjugate of
  ``jax.grad(loss)`` as the gradient, the direction whose negative descends. Then
  :math:`P = Q^H Q` with complex dense factors (Hermitian positive definite for procrustes) and
  real positive diagonal ones, Gram terms :math:`A A^H`, probes :math:`v \sim CN(0, I)`;
  whitening converges to :math:`E[h h^H]^{-1/2}`, Newton (whose Hessian-vector product is the
  conjugate of ``jax.jvp(jax.grad(obj_fn))``) to :math:`|H|^{-1}`.

  Non-finite gradients propagate into the momentum, the factors and the update (the step is
  visibly NaN, never silently wrong); wrap the optimizer in ``optax.apply_if_finite`` to skip such
  steps and keep the state clean.

  The refit schedule is deterministic: the probabilities are summed from the step count and the
  preconditioner is refitted whenever the sum reaches an integer (identical on every device),
  inside one top-level ``lax.cond`` that does no fitting work on other steps. Every step's update
  is :math:`P_t \hat m_t` with :math:`P_t` as it stands before that step's refit, in every
  geometry and criterion (where the refit's own fitting pair already holds it, procrustes
  whitening on the momentum, it is taken from there).

  Args:
    b1: momentum :math:`b_1` in [0, 1), or None for none (0 keeps a momentum buffer equal to
      the gradient, so the state's structure never depends on the value).
    nesterov: use Nesterov momentum.
    precond_lr: :math:`\mu`, float or schedule of the step count.
    precond_update_prob: probability of refitting :math:`Q` per step, float in (0, 1] or a
      schedule; the default :func:`precond_update_prob_schedule` is 1 for 200 steps, then
      decays to 0.03.
    precond_init_scale: initial :math:`Q = s I`; None sets :math:`s` from the first fitting pair
      (``(mean h⁴ / mean v⁴)^(-1/8)`` per leaf, computed without overflow for any finite
      gradient; 1 for zero or non-finite gradients).
    criterion: ``'whitening'`` or ``'newton'``.
    geometry: ``'procrustes'`` (default), ``'triangular'`` or ``'quad'``.
    precond_fit_on: whitening target: ``'momentum'`` (:math:`\hat m_t`) or ``'gradient'``.
    max_size_dense: largest axis with a dense factor; None means 8192. (This and the other
      numbers deciding the state's shapes default to None, not to their value, so that
      ``optax.inject_hyperparams`` leaves them static.)
    min_ndim_dense: tensors with fewer axes get only diagonal factors; None means 2.
    max_skew_dense: an axis with ``size² <= max_skew_dense · numel`` is dense (every rule
      above permitting); None means 2.0 (such a factor holds at most twice the leaf's
      entries). Pass ``float('inf')`` to make every axis up to ``max_size_dense`` dense
      (psgd_jax's structure).
    dense_budget: skewed axes (``size² > max_skew_dense · numel``) are dense while all dense
      factors of the tree hold at most ``dense_budget`` times the params' entries (least
      skewed first, see above); None means 1.0, 0 keeps every skewed axis diagonal and
      ``float('inf')`` makes them all dense.
    memory_save_mode: None, ``'one_diag'`` (largest axis diagonal) or ``'all_diag'``.
    block_size: None (default) keeps every axis whole. An int partitions each axis longer than
      ``block_size`` into the fewest equal blocks no longer than it (``d / n`` for the smallest
      ``n >= d / block_size`` dividing ``d``; 12288 with 4096 → 3 blocks of 4096, 50257 → 29 of
      1733). Every block of the leaf gets its own factors, fitted and applied independently (one
      vmapped batch with the layers of a stacked leaf), so memory and time per leaf are bounded
      by the block size. The rules above then apply to the block's shape. An axis whose length
      has no divisor near ``d / block_size`` (a prime) falls back to small blocks.
    damping: damping of the fitting target relative to its RMS (>= 0; absolute where the target
      is all zero). It caps the dynamic range of :math:`P` at ``1 / damping`` times the
      target's scale; the default 1e-9 lies below float32 round-off, leaving the fixed points
      exact (1e-3 already moves Newton's cosine to ``H⁻¹ g`` from 1.0000 to 0.998).
    lipschitz_decay: :math:`\beta_L` in [0, 1).
    update_clip: largest RMS of a preconditioned update per tensor (per layer when stacked, per
      block with ``block_size``); None disables the clip.
    mu_dtype: momentum dtype (its complex counterpart for complex params); None means the
      param's.
    precond_dtype: dtype of the factors (bfloat16 works); None means float32 (float64 for
      float64 params). Gram terms, norms and solves always run in float32 or wider. For complex
      params it names the precision: dense factors take its complex counterpart (complex64
      for float32 and the half types, complex128 for float64), diagonal factors stay real.
    stacked_layers: pytree of bools (prefix of the params, or a callable of them): True where a
      leaf's leading axis stacks layers (``nn.scan``); each layer gets its own factors (vmapped).
    group_multiple: None (1) or an int: every factor group (all fitting units, of any leaves,
      with the same factor shapes and dtypes, stored and fitted as one batch) is padded with
      identity units to a multiple of it, so :func:`optax_rlx.state_sharding` can shard each
      group evenly over that many devices (use the size of the mesh axes the params are
      sharded over). Padding units are fitted on zeros and never applied.
    group_axes: mesh axis name(s) the factor groups' leading axis is sharded over; None means
      every axis of the mesh. Each group keeps the axes, in order, while the product of their
      sizes divides the group's size (replicated if none does), so each device stores and
      refits its share (:func:`optax_rlx.state_sharding`; XLA moves the gradients to the
      factors and the updates back, O(params) bytes).
    cache_precond: store :math:`P_i = Q_i^H Q_i` (``KronState.Ps``, as much memory again as
      the factors), recomputed only at refits, so the steps between refits apply :math:`P` with
      one matmul per dense factor instead of two (or instead of forming :math:`Q_i^H Q_i`).
      Off by default: the memory goes to dense factors (``dense_budget``) instead. Worth
      turning on for long runs (refit probability near its 0.03 floor) where memory allows.
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
    >>> sorted(state.Qs)  # stored by factor group, named by factor shapes and dtype
    ['3_float32', '4x4_4x4_float32', '64_8x8_float32']
    >>> [q.shape for q in state.Qs['64_8x8_float32']]  # a group of one unit
    [(1, 64), (1, 8, 8)]
    >>> qs = optax_rlx.kron_by_leaf(state.Qs, params)  # per leaf; 64² > 2 · 64·8, over budget
    >>> [[q.shape for q in qs[k]] for k in ('w', 'emb', 'b')]
    [[(4, 4), (4, 4)], [(64,), (8, 8)], [(3,)]]
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state)
    >>> updates['emb'].shape, int(state.count)
    ((64, 8), 1)
  """

  cfg = make_config(options, "scale_by_kron")

  def init_fn(params: Any) -> KronState:
    return init_state(params, cfg)

  def update_fn(updates: Any, state: KronState, params: Any = None,
                obj_fn: Callable[[Any], jax.Array] | None = None,
                **extra_args: Any) -> tuple[Any, KronState]:
    del extra_args
    return _kron_update.update(updates, state, params, obj_fn, cfg)

  return _variables.plain_arrays(optax.GradientTransformationExtraArgs(init_fn, update_fn))


@takes_options
def kron(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    **options: Unpack[KronOptions],
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
    weight_decay: :math:`\lambda` >= 0.
    weight_decay_mask: pytree of bools (prefix of the params) or a callable of the params.
    {options of scale_by_kron}

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
  return optax.chain(
      scale_by_kron(**options),
      _common.decoupled_weight_decay(weight_decay, weight_decay_mask, OWNER),
      optax.scale_by_learning_rate(learning_rate),
  )


@takes_options
def kron_by_leaf(groups: Mapping[str, tuple[jax.Array, ...]], params: Any,
                 **options: Unpack[KronOptions]) -> Any:
  """The per-leaf view of Kron's factor groups: ``KronState.Qs``, ``Ls`` or ``Ps`` per param.

  The state stores factors by group (:class:`KronState`); which leaf's units sit where follows
  from the params' shapes and the options that decide the structure, so pass the same options
  as to :func:`kron` (the others are ignored).

  Args:
    groups: ``state.Qs``, ``state.Ls`` or ``state.Ps`` of a :class:`KronState` (arrays or
      ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``).
    params: the params (arrays or ``jax.ShapeDtypeStruct``).
    **options: the options of :func:`scale_by_kron` the state was made with.

  Returns:
    A pytree like ``params`` whose leaves are tuples, one array per axis: ``(d, d)`` dense or
    ``(d,)`` diagonal factors (scalars for Lipschitz estimates), with a leading
    ``(layers · blocks,)`` axis for stacked or blocked leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_rlx
    >>> params = {'w': jnp.zeros((4, 4)), 'stack': jnp.zeros((3, 4, 4))}
    >>> tx = optax_rlx.kron(1e-3, stacked_layers={'w': False, 'stack': True})
    >>> state = tx.init(params)[0]
    >>> state.Qs['4x4_4x4_float32'][0].shape  # w's unit, then stack's three layers
    (4, 4, 4)
    >>> qs = optax_rlx.kron_by_leaf(state.Qs, params, stacked_layers={'w': False, 'stack': True})
    >>> [q.shape for q in qs['w']], [q.shape for q in qs['stack']]
    ([(4, 4), (4, 4)], [(3, 4, 4), (3, 4, 4)])
  """
  cfg = make_config(options, "kron_by_leaf")
  params = _variables.split_variables(params)[0]
  return by_leaf(groups, tree_layout(params, cfg), jax.tree.structure(params))


def fill_masked(obj_fn: Callable[[Any], jax.Array], params: Any) -> Callable[[Any], jax.Array]:
  """An ``obj_fn`` for Kron's Newton criterion under ``optax.masked`` or ``multi_transform``.

  There Kron sees the params with ``optax.MaskedNode`` in place of the leaves it does not
  update, and calls ``obj_fn`` with that tree. The function returned fills those places from the
  full ``params`` (constants: their Hessian blocks are not fitted) and calls ``obj_fn``.

  Args:
    obj_fn: the loss of the full params, ``params -> scalar``.
    params: the full params (the step's current values).

  Returns:
    ``partial_params -> obj_fn(params with the partial ones in their places)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_rlx
    >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.ones(3)}
    >>> def loss(p):
    ...   return jnp.sum((p['w'] @ jnp.arange(3.0) - 1.0) ** 2) + jnp.sum(p['b'] ** 2)
    >>> tx = optax.multi_transform(
    ...     {'kron': optax_rlx.kron(1e-2, criterion='newton'), 'adam': optax.adam(1e-2)},
    ...     {'w': 'kron', 'b': 'adam'})
    >>> updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
    ...                            obj_fn=optax_rlx.fill_masked(loss, params))
    >>> updates['w'].shape
    (4, 3)
  """

  def is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)

  def filled(partial: Any) -> jax.Array:
    merged = jax.tree.map(lambda p, q: jax.lax.stop_gradient(p) if is_masked(q) else q,
                          params, partial, is_leaf=is_masked)
    return obj_fn(merged)

  return filled


kron.__doc__ = (kron.__doc__ or "").replace("{options of scale_by_kron}",
                                            _common.args_section(scale_by_kron.__doc__ or ""))
