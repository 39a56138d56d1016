"""Adafactor: factored second moments with sublinear memory (Shazeer & Stern, 2018)."""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_rlx import _common, _variables
from optax_rlx._adafactor_plan import Factoring, check_policy, factored_axes, reduced

_OWNER = "adafactor"
_DEFAULT_MIN_DIM_SIZE_TO_FACTOR = 128


class AdafactorState(NamedTuple):
  """State of :func:`scale_by_adafactor`.

  For a leaf of shape ``S`` factored over ``(row_axis, col_axis)`` (see ``factoring``), the
  statistics are ``v_row`` of shape ``S`` with ``col_axis`` reduced to size 1 and ``v_col`` of
  shape ``S`` with ``row_axis`` reduced to size 1 (a (rows, cols) matrix has ``v_row`` (rows, 1)
  and ``v_col`` (1, cols)): ``O(rows + cols)`` numbers per matrix, one pair per slice of the other
  (batch) axes. Keeping the reduced axis makes every statistic's axes line up with its param's, so
  it can take the param's sharding (see :func:`optax_rlx.state_sharding`). Unfactored leaves keep
  the full EMA ``v`` of shape ``S``. Unused slots hold a ``(1,)`` placeholder. Statistics are
  real, float32 (float64 for float64 and complex128 params) whatever the param dtype.

  Attributes:
    count: int32 scalar, the number of updates applied so far.
    v_row: pytree like the params, EMA of the row means of ``g² + epsilon1``.
    v_col: pytree like the params, EMA of the column means of ``g² + epsilon1``.
    v: pytree like the params, full EMA of ``g² + epsilon1`` for unfactored leaves.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
  v_row: optax.Updates
  v_col: optax.Updates
  v: optax.Updates


class AdafactorStepState(NamedTuple):
  """State of the step-size part of :func:`adafactor` (learning rate, momentum).

  Attributes:
    count: int32 scalar, the number of updates applied so far (drives schedules).
    mu: pytree like the params, momentum in ``mu_dtype``; ``()`` when ``b1`` is None.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
  mu: optax.Updates


def relative_step_schedule(max_learning_rate: float = 1e-2) -> optax.Schedule:
  """The paper's relative step size ``ρ_t = min(max_learning_rate, 1/√t)``, with ``t = count + 1``.

  With the default ``1e-2`` it is constant for the first 10⁴ steps, then decays as ``1/√t``.

  Args:
    max_learning_rate: the cap of ``ρ_t`` (the paper uses ``1e-2``; ``torch.optim.Adafactor``
      calls it ``lr``).

  Returns:
    An optax schedule of the step count.

  Example:
    >>> import optax_rlx
    >>> rho = optax_rlx.relative_step_schedule()
    >>> print(f"{rho(0):.4f} {rho(9_999):.4f} {rho(39_999):.4f}")
    0.0100 0.0100 0.0050
  """
  _common.check_number(
      "relative_step_schedule", "max_learning_rate", max_learning_rate, low=0.0, low_open=True
  )

  def schedule(count: ArrayLike) -> jax.Array:
    t = jnp.asarray(count, jnp.float32) + 1.0
    return jnp.minimum(jnp.asarray(max_learning_rate, jnp.float32), jax.lax.rsqrt(t))

  return schedule


def _leaf_policies(factoring: Any, tree: Any) -> list[Any]:
  """One factoring policy per leaf of ``tree``."""
  num_leaves = len(jax.tree.leaves(tree))
  if isinstance(factoring, str) or callable(factoring):
    return [factoring] * num_leaves
  try:
    policies = jax.tree_util.tree_structure(tree).flatten_up_to(factoring)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{_OWNER}: a per-leaf `factoring` tree must have the params' structure: {e}"
    ) from e
  for policy in policies:
    check_policy(policy)
  return policies


def _beta2(count: jax.Array, decay_rate: Any, decay_offset: Any, beta2_cap: Any) -> jax.Array:
  """β̂₂ = 1 − t^(−decay_rate), t = max(count − decay_offset, 0) + 1, optionally capped."""
  t = (jnp.maximum(count - decay_offset, 0) + 1).astype(jnp.float32)
  beta2 = 1.0 - t ** (-decay_rate)
  if beta2_cap is not None:
    beta2 = jnp.minimum(beta2, beta2_cap)
  return beta2


@dataclasses.dataclass(frozen=True)
class _AdafactorConfig:
  """The validated options of :func:`scale_by_adafactor` (numbers may be traced)."""

  decay_rate: Any
  decay_offset: Any
  beta2_cap: Any
  epsilon1: Any
  variance_floor: Any
  clipping_threshold: Any
  factoring: Any
  min_dim_size_to_factor: int


def _init(params: Any, cfg: _AdafactorConfig) -> AdafactorState:
  """Zero statistics: ``v_row``/``v_col`` for factored leaves, ``v`` for the others."""
  _common.check_inexact_leaves(_OWNER, params, "params")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  policies = _leaf_policies(cfg.factoring, params)
  v_row, v_col, v = [], [], []
  for (path, p), policy in zip(leaves, policies, strict=True):
    shape, dtype = tuple(p.shape), _common.real_stats_dtype(p.dtype)
    # A (1,) placeholder per slot, never one array in two: a donated state must not hold the
    # same buffer twice.
    placeholder = functools.partial(jnp.zeros, (1,), dtype)
    axes = factored_axes(policy, _common.path_str(path), shape, cfg.min_dim_size_to_factor,
                         for_init=True)
    zeros = functools.partial(_common.zeros_like_layout, dtype=dtype, param=p)
    if axes is None:
      v_row.append(placeholder())
      v_col.append(placeholder())
      v.append(zeros(shape))
    else:
      row_axis, col_axis = axes
      v_row.append(zeros(reduced(shape, col_axis)))
      v_col.append(zeros(reduced(shape, row_axis)))
      v.append(placeholder())

  return AdafactorState(
      count=jnp.zeros([], jnp.int32),
      v_row=treedef.unflatten(v_row),
      v_col=treedef.unflatten(v_col),
      v=treedef.unflatten(v),
  )


def _update_unfactored(path: Any, g: jax.Array, v: jax.Array, beta2: jax.Array,
                       cfg: _AdafactorConfig) -> tuple[jax.Array, jax.Array]:
  """``V ← β̂ V + (1 − β̂)(|G|² + ε₁)``, ``U = G / √V``; returns ``(U, V)``."""
  if tuple(v.shape) != tuple(g.shape):
    raise ValueError(
        f"{_OWNER}: leaf {_common.path_str(path)} has gradient shape {tuple(g.shape)} but the "
        f"state was initialised for shape {tuple(v.shape)}."
    )
  g = g.astype(_common.like_param_dtype(v.dtype, g.dtype))
  new_v = beta2 * v + (1.0 - beta2) * _squares(g, 1, cfg.epsilon1)
  if cfg.variance_floor is None:
    u = g * new_v**-0.5
  else:  # a floor below 1e-19 squares to zero
    floor = jnp.maximum(cfg.variance_floor**2, jnp.finfo(new_v.dtype).tiny)
    u = g * jax.lax.rsqrt(jnp.maximum(new_v, floor))
  return u, new_v.astype(v.dtype)


class _LeafStats(NamedTuple):
  """One leaf's statistics (see :class:`AdafactorState`)."""

  v_row: jax.Array
  v_col: jax.Array
  v: jax.Array


def _update_factored(path: Any, policy: Any, g: jax.Array, stats: _LeafStats, beta2: jax.Array,
                     cfg: _AdafactorConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Row and column EMAs of ``|G|² + ε₁``, ``U = G / √(R Cᵀ / mean(R))``; returns ``(U, R, C)``."""
  v_row, v_col = stats.v_row, stats.v_col
  shape = tuple(g.shape)
  axes = factored_axes(policy, _common.path_str(path), shape, cfg.min_dim_size_to_factor,
                       for_init=False)
  row_axis, col_axis = axes if axes is not None else (-1, -1)
  if (
      axes is None
      or tuple(v_row.shape) != reduced(shape, col_axis)
      or tuple(v_col.shape) != reduced(shape, row_axis)
  ):
    raise ValueError(
        f"{_OWNER}: leaf {_common.path_str(path)} has gradient shape {shape}, which does not "
        f"match its factored state (row statistics {tuple(v_row.shape)}, column statistics "
        f"{tuple(v_col.shape)})."
    )
  g = g.astype(_common.like_param_dtype(v_row.dtype, g.dtype))
  g_sq = _squares(g, max(shape[row_axis], shape[col_axis]), cfg.epsilon1)
  new_row = beta2 * v_row + (1.0 - beta2) * jnp.mean(g_sq, axis=col_axis, keepdims=True)
  new_col = beta2 * v_col + (1.0 - beta2) * jnp.mean(g_sq, axis=row_axis, keepdims=True)
  row_mean = jnp.mean(new_row, axis=row_axis, keepdims=True)
  tiny = jnp.finfo(new_row.dtype).tiny
  if cfg.variance_floor is None:
    # A row at ε₁ beside rows of |g| > 1e4: the ratio flushed to 0 and 0·∞ gave NaN (floored).
    u = g * jnp.maximum(new_row / row_mean, tiny) ** -0.5 * new_col**-0.5
  else:
    floor = cfg.variance_floor
    v_hat = new_row / jnp.maximum(row_mean, floor) * new_col  # R Cᵀ alone can overflow
    u = g * jax.lax.rsqrt(jnp.maximum(v_hat, jnp.maximum(floor * floor, tiny)))  # as above
  return u, new_row.astype(v_row.dtype), new_col.astype(v_col.dtype)


def _squares(g: jax.Array, count: int, epsilon1: Any) -> jax.Array:
  """``|g|² + ε₁``, saturated at the dtype's max / (4 · count) so that means of ``count`` of
  them, their EMAs and the mean of those stay finite (float32: |g| above 8e17 on 128-long axes,
  4e16 on 50257); exact below, and non-finite where ``g`` is."""
  sq = _common.abs2(g) + epsilon1
  return jnp.where(jnp.isfinite(g), jnp.minimum(sq, jnp.finfo(sq.dtype).max / (4 * count)), sq)


def _clip(u: jax.Array, threshold: Any) -> jax.Array:
  """``u / max(1, RMS(u) / threshold)``, with ``u``'s finite entries first bounded so that
  ``|u|²`` sums without overflow (saturated statistics can give entries above 1e19)."""
  bound = jnp.sqrt(jnp.finfo(_common.real_dtype(u.dtype)).max / (4 * max(u.size, 1)))
  if jnp.iscomplexobj(u):
    bounded = jax.lax.complex(jnp.clip(u.real, -bound, bound), jnp.clip(u.imag, -bound, bound))
  else:
    bounded = jnp.clip(u, -bound, bound)
  u = jnp.where(jnp.isfinite(u), bounded, u)
  return u / jnp.maximum(1.0, jnp.sqrt(jnp.mean(_common.abs2(u))) / threshold)


def _update_leaf(path: Any, policy: Any, g: jax.Array, stats: _LeafStats, beta2: jax.Array,
                 cfg: _AdafactorConfig) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One leaf's clipped direction and new statistics ``(Û, v_row, v_col, v)``."""
  v_row, v_col, v = stats
  # The state decides: a factored leaf's full moment is the (1,) placeholder.
  if len(g.shape) >= 2 and tuple(v.shape) == (1,):  # factored
    u, v_row, v_col = _update_factored(path, policy, g, stats, beta2, cfg)
  else:
    u, v = _update_unfactored(path, g, v, beta2, cfg)
  if cfg.clipping_threshold is not None:
    u = _clip(u, cfg.clipping_threshold)
  return u.astype(g.dtype), v_row, v_col, v


def _update(updates: Any, state: Any, params: Any,
            cfg: _AdafactorConfig) -> tuple[Any, AdafactorState]:
  if not isinstance(state, AdafactorState):
    raise ValueError(f"{_OWNER}: expected an AdafactorState, got {type(state).__name__}.")
  v_rows, v_cols, vs = state.v_row, state.v_col, state.v
  _common.check_same_structure(_OWNER, vs, "the optimizer state", updates, "the updates")
  if params is not None:
    _common.check_same_shapes(_OWNER, params, "the params", updates, "the updates")
  _common.check_inexact_leaves(_OWNER, updates, "the updates")
  beta2 = _beta2(state.count, cfg.decay_rate, cfg.decay_offset, cfg.beta2_cap)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
  per_leaf = [
      _update_leaf(path, policy, g, _LeafStats(v_row, v_col, v), beta2, cfg)
      for (path, g), policy, v_row, v_col, v in zip(
          leaves,
          _leaf_policies(cfg.factoring, updates),
          treedef.flatten_up_to(v_rows),
          treedef.flatten_up_to(v_cols),
          treedef.flatten_up_to(vs),
          strict=True,
      )
  ]

  def field(i: int) -> Any:
    return treedef.unflatten([out[i] for out in per_leaf])

  new_state = AdafactorState(
      count=optax.safe_increment(state.count),
      v_row=field(1),
      v_col=field(2),
      v=field(3),
  )
  return field(0), new_state


def scale_by_adafactor(
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    beta2_cap: float | None = None,
    epsilon1: float = 1e-30,
    variance_floor: float | None = None,
    clipping_threshold: float | None = 1.0,
    factoring: Factoring = "largest_two",
    min_dim_size_to_factor: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Adafactor's factored second-moment estimate, then clips their RMS.

  For a gradient ``G`` factored over ``(row_axis, col_axis)`` (``n`` rows, ``m`` columns), with
  ``t`` the 1-based step and all other axes treated as independent batch axes:

  .. math::

    \hat\beta_{2,t} &= \min(\mathtt{beta2\_cap},\ 1 - t^{-\mathtt{decay\_rate}}) \\
    R_t &= \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,
           \mathrm{mean}_{j}(G^2 + \epsilon_1) \qquad (\text{rows}, \in \mathbb{R}^n) \\
    C_t &= \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,
           \mathrm{mean}_{i}(G^2 + \epsilon_1) \qquad (\text{columns}, \in \mathbb{R}^m) \\
    \hat V_t &= R_t C_t^\top / \mathrm{mean}_k (R_t)_k, \qquad U_t = G / \sqrt{\hat V_t} \\
    \hat U_t &= U_t / \max(1, \mathrm{RMS}(U_t) / d)

  where :math:`\epsilon_1` is ``epsilon1`` and :math:`d` is ``clipping_threshold``. Leaves that
  are not factored (vectors, scalars, small matrices) keep a full EMA :math:`V_t` of
  :math:`G^2 + \epsilon_1` and use :math:`U_t = G/\sqrt{V_t}`. The output is the descent
  direction :math:`\hat U_t` (no learning rate, no sign flip); see :func:`adafactor` for the
  step size. Dividing by the *mean* of :math:`R` (not its sum) makes :math:`\hat V` exact for
  rank-1 second moments and the direction invariant to the gradient's scale.

  With ``variance_floor=f`` the additive :math:`\epsilon_1` is replaced by
  ``torch.optim.Adafactor``'s clamps: :math:`\hat V = R C^\top / \max(\mathrm{mean}(R), f)` and
  :math:`U = G / \sqrt{\max(\hat V, f^2)}` (use ``epsilon1=0`` and ``f = 1.19e-7``, float32's
  machine epsilon, for torch's rule).

  Args:
    decay_rate: the exponent ``c`` in :math:`\hat\beta_{2,t} = 1 - t^{-c}` (paper: 0.8).
    decay_offset: step at which the :math:`\hat\beta_2` schedule restarts (fine-tuning); steps
      before it use ``t = 1``, so no offset can produce a NaN.
    beta2_cap: optional upper bound on :math:`\hat\beta_{2,t}` (Zhai et al. use 0.999).
    epsilon1: added to :math:`G^2` before averaging (paper: 1e-30).
    variance_floor: ``None`` (paper), or ``f`` for ``torch.optim.Adafactor``'s clamps:
      :math:`\hat V = R C^\top / \max(\mathrm{mean}(R), f)`,
      :math:`U = G / \sqrt{\max(\hat V, f^2)}`.
    clipping_threshold: :math:`d`, the largest RMS of the update per leaf; ``None`` disables it.
    factoring: which two axes of an N-D leaf to factor: ``'largest_two'`` (the two largest axes,
      as optax and T5X), ``'last_two'`` (as torch and Hugging Face), ``'none'``, a callable
      ``rule(path, shape) -> (row_axis, col_axis) | None`` (``path`` is a string such as
      ``"['dense']['kernel']"``), or a pytree of those with the params' structure. Under
      ``optax.inject_hyperparams``, list a callable in ``static_args``.
    min_dim_size_to_factor: with a named policy, factor only when both chosen axes have at
      least this size; ``None`` means 128 (optax/T5X). A callable rule decides alone.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is :class:`AdafactorState`.

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
    <https://arxiv.org/abs/1804.04235>`_, ICML 2018.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_rlx
    >>> tx = optax_rlx.scale_by_adafactor(min_dim_size_to_factor=2)
    >>> params = {'w': jnp.ones((3, 4)), 'b': jnp.ones(4)}
    >>> state = tx.init(params)
    >>> state.v_row['w'].shape, state.v_col['w'].shape, state.v['b'].shape
    ((3, 1), (1, 4), (4,))
    >>> grads = {'w': jnp.full((3, 4), 10.0), 'b': jnp.full(4, -0.1)}
    >>> updates, state = tx.update(grads, state)
    >>> print(updates['w'][0, 0], updates['b'][0])
    1.0 -1.0
  """
  check = _common.check_number
  check(_OWNER, "decay_rate", decay_rate, low=0.0, low_open=True)
  check(_OWNER, "beta2_cap", beta2_cap, low=0.0, high=1.0, low_open=True, allow_none=True)
  check(_OWNER, "epsilon1", epsilon1, low=0.0)
  check(_OWNER, "variance_floor", variance_floor, low=0.0, low_open=True, allow_none=True)
  check(_OWNER, "clipping_threshold", clipping_threshold, low=0.0, low_open=True, allow_none=True)
  check(_OWNER, "decay_offset", decay_offset, low=0.0)
  if variance_floor is None and _common.is_zero(epsilon1):
    raise ValueError(
        f"{_OWNER}: `epsilon1=0` needs a positive `variance_floor`, otherwise a zero gradient "
        f"gives 0/0."
    )
  for policy in jax.tree.leaves(factoring):
    check_policy(policy)
  cfg = _AdafactorConfig(
      decay_rate=decay_rate,
      decay_offset=decay_offset,
      beta2_cap=beta2_cap,
      epsilon1=epsilon1,
      variance_floor=variance_floor,
      clipping_threshold=clipping_threshold,
      factoring=factoring,
      min_dim_size_to_factor=(
          _DEFAULT_MIN_DIM_SIZE_TO_FACTOR
          if min_dim_size_to_factor is None
          else _common.static_int(_OWNER, "min_dim_size_to_factor", min_dim_size_to_factor,
                                  low=1)
      ),
  )

  def init_fn(params: Any) -> Any:
    return _init(params, cfg)

  def update_fn(updates: Any, state: Any, params: Any = None,
                **extra_args: Any) -> tuple[Any, Any]:
    del extra_args
    return _update(updates, state, params, cfg)

  return _variables.plain_arrays(optax.GradientTransformationExtraArgs(init_fn, update_fn))


class _StepOptions(NamedTuple):
  """``adafactor``'s options of the step after the direction (names as in its signature)."""

  learning_rate: Any
  multiply_by_parameter_scale: bool
  epsilon2: Any
  b1: Any
  mu_dtype: Any
  weight_decay: Any
  weight_decay_mask: Any


def _scale_by_adafactor_step(options: _StepOptions) -> optax.GradientTransformationExtraArgs:
  """Applies Adafactor's step size, momentum, weight decay and the sign flip (see ``adafactor``)."""
  (learning_rate, multiply_by_parameter_scale, epsilon2, b1, mu_dtype, weight_decay,
   weight_decay_mask) = options
  use_momentum = b1 is not None  # 0 keeps the buffer: one state structure for every value
  use_decay = not _common.is_zero(weight_decay)
  needs_params = multiply_by_parameter_scale or use_decay

  def init_fn(params: Any) -> Any:
    mu = _common.momentum_like(params, mu_dtype) if use_momentum else ()
    return AdafactorStepState(count=jnp.zeros([], jnp.int32), mu=mu)

  def update_fn(updates: Any, state: Any, params: Any = None,
                **extra_args: Any) -> tuple[Any, Any]:
    del extra_args
    if needs_params and params is None:
      raise ValueError(
          f"{_OWNER}: `params` must be passed to `update` when multiply_by_parameter_scale=True "
          f"or weight_decay != 0."
      )
    lr = _common.schedule_value(learning_rate, state.count)
    out = jax.tree.map(lambda u: lr * u, updates)
    if multiply_by_parameter_scale:
      out = jax.tree.map(
          lambda u, p: u
          * optax.safe_root_mean_squares(p.astype(_common.stats_dtype(p.dtype)), epsilon2),
          out,
          params,
      )
    mu = state.mu
    if use_momentum:
      out = jax.tree.map(lambda u, m: (1.0 - b1) * u + b1 * m, out, state.mu)
      mu = jax.tree.map(lambda u, m: u.astype(m.dtype), out, state.mu)
    if use_decay:
      mask = (
          jax.tree.map(lambda _: True, params)
          if weight_decay_mask is None
          else _common.resolve_mask(weight_decay_mask, params)
      )
      out = jax.tree.map(
          lambda u, p, m: u + (lr * weight_decay) * p if m else u, out, params, mask
      )
    out = jax.tree.map(lambda u, g: (-1.0 * u).astype(g.dtype), out, updates)
    return out, AdafactorStepState(count=optax.safe_increment(state.count), mu=mu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adafactor(
    learning_rate: optax.ScalarOrSchedule | None = None,
    multiply_by_parameter_scale: bool = True,
    epsilon2: float = 1e-3,
    clipping_threshold: float | None = 1.0,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    beta2_cap: float | None = None,
    epsilon1: float = 1e-30,
    variance_floor: float | None = None,
    factoring: Factoring = "largest_two",
    min_dim_size_to_factor: int | None = None,
    b1: float | None = None,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The Adafactor optimizer (Shazeer & Stern, 2018), paper defaults.

  :func:`scale_by_adafactor` gives the clipped, normalised direction :math:`\hat U_t`. This
  alias turns it into a step, in the paper's (and optax's, T5X's) order:

  .. math::

    \eta_t &= \mathtt{learning\_rate}(t), \text{ or } \rho_t = \min(10^{-2}, 1/\sqrt{t})
              \text{ when it is None (relative step)} \\
    s_t &= \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1})) \text{ if multiply\_by\_parameter\_scale,
           else } 1 \\
    m_t &= b_1 m_{t-1} + (1 - b_1)\, \eta_t s_t \hat U_t \quad (\text{if } b_1;
           \text{ else } m_t = \eta_t s_t \hat U_t) \\
    \theta_t &= \theta_{t-1} - m_t - \eta_t \lambda\, \theta_{t-1}

  Momentum (``b1``, off by default as in the paper) averages the final scaled step, without
  bias correction, like optax, T5X and Hugging Face; it is stored in ``mu_dtype`` (bfloat16
  momentum is the ViT-G recipe of Zhai et al.). Weight decay :math:`\lambda` (``weight_decay``)
  is decoupled: it is multiplied by the learning rate :math:`\eta_t` (the relative step when
  ``learning_rate`` is None) but *not* by the parameter scale :math:`s_t` nor the clip, and it
  skips leaves where ``weight_decay_mask`` is False.

  Configurations:

  * Paper (Alg. 4/5, Alg. 6 defaults): the defaults. The only difference from the paper is that
    matrices whose chosen axes are below ``min_dim_size_to_factor`` (128) keep a full second
    moment; pass ``min_dim_size_to_factor=1`` to factor every matrix.
  * ``optax.adafactor(lr, momentum=b1, weight_decay_rate=None)``: ``adafactor(lr, b1=b1,
    mu_dtype=jnp.float32)``, bit-identical under ``jit`` in float32 (optax's ``learning_rate=None``
    means a step of 1, ours means the relative step; optax's ``weight_decay_rate`` is not
    multiplied by the learning rate, ours is: use ``weight_decay=rate / lr``).
  * ``torch.optim.Adafactor(lr=γ, weight_decay=λ)``: ``adafactor(relative_step_schedule(γ),
    weight_decay=λ, epsilon1=0.0, variance_floor=1.1920929e-07, factoring='last_two',
    min_dim_size_to_factor=1)``. Torch multiplies the decay by ``γ`` rather than
    :math:`\rho_t`; the two agree for the first :math:`1/\gamma^2` steps (10⁴ at ``γ=1e-2``).

  Complex parameters: pass the conjugate of ``jax.grad(loss)`` (optax's convention). The
  statistics are EMAs of :math:`|G|^2` (real), the step :math:`\hat U` is complex in the
  gradient's dtype, and the parameter scale is :math:`\mathrm{RMS}(|\theta|)`.

  Non-finite gradients propagate into the statistics and the update (as in optax); wrap the
  optimizer in ``optax.apply_if_finite`` to skip such steps and keep the state clean.

  Args:
    learning_rate: a float or optax schedule :math:`\eta_t`; ``None`` (default) is the paper's
      relative step :func:`relative_step_schedule`.
    multiply_by_parameter_scale: scale steps by :math:`s_t` (paper: True).
    epsilon2: :math:`\epsilon_2`, the floor of the parameter scale (paper: 1e-3).
    {options of scale_by_adafactor}
    b1: momentum decay :math:`b_1` in [0, 1), or None for no momentum (paper); 0 keeps a
      momentum buffer, so the state's structure never depends on the value.
    mu_dtype: dtype of the momentum (its complex counterpart for complex params); None means
      the param dtype.
    weight_decay: :math:`\lambda`, decoupled weight decay (>= 0).
    weight_decay_mask: a pytree of bools (or a prefix of the params, or a callable of the
      params returning one): True where weight decay applies. None means everywhere.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its state is the tuple
    ``(AdafactorState, AdafactorStepState)``.

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
    <https://arxiv.org/abs/1804.04235>`_, ICML 2018.

    Zhai et al., `Scaling Vision Transformers <https://arxiv.org/abs/2106.04560>`_, CVPR 2022.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_rlx
    >>> def loss(params):
    ...   return jnp.sum((params['w'] - 1.0) ** 2) + jnp.sum(params['b'] ** 2)
    >>> params = {'w': jnp.zeros((4, 3)), 'b': jnp.full(3, 0.5)}
    >>> schedule = optax.cosine_decay_schedule(0.1, decay_steps=200)
    >>> tx = optax.chain(
    ...     optax.clip_by_global_norm(1.0),
    ...     optax_rlx.adafactor(schedule, multiply_by_parameter_scale=False),
    ... )
    >>> state = tx.init(params)
    >>> print(f"{loss(params):.2f}")
    12.75
    >>> for _ in range(200):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{loss(params):.4f}")
    0.0000
  """
  check = _common.check_number
  check(_OWNER, "learning_rate", learning_rate, low=0.0, allow_none=True, allow_schedule=True)
  check(_OWNER, "epsilon2", epsilon2, low=0.0)
  check(_OWNER, "b1", b1, low=0.0, high=1.0, high_open=True, allow_none=True)
  check(_OWNER, "weight_decay", weight_decay, low=0.0)
  _common.check_bool(_OWNER, "multiply_by_parameter_scale", multiply_by_parameter_scale)
  _common.check_float_dtype(_OWNER, "mu_dtype", mu_dtype)
  step_size = relative_step_schedule() if learning_rate is None else learning_rate
  return optax.chain(
      scale_by_adafactor(
          decay_rate=decay_rate,
          decay_offset=decay_offset,
          beta2_cap=beta2_cap,
          epsilon1=epsilon1,
          variance_floor=variance_floor,
          clipping_threshold=clipping_threshold,
          factoring=factoring,
          min_dim_size_to_factor=min_dim_size_to_factor,
      ),
      _scale_by_adafactor_step(_StepOptions(
          learning_rate=step_size,
          multiply_by_parameter_scale=multiply_by_parameter_scale,
          epsilon2=epsilon2,
          b1=b1,
          mu_dtype=mu_dtype,
          weight_decay=weight_decay,
          weight_decay_mask=weight_decay_mask,
      )),
  )


adafactor.__doc__ = (adafactor.__doc__ or "").replace(
    "{options of scale_by_adafactor}", _common.args_section(scale_by_adafactor.__doc__ or ""))
