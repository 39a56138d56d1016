"""Kron-PSGD: preconditioned SGD with a Kronecker-factored preconditioner fitted on a Lie group."""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_rlx import _common

_OWNER = "kron"
_CRITERIA = ("whitening", "newton")
_GEOMETRIES = ("triangular", "procrustes")
_MEMORY_SAVE_MODES = (None, "one_diag", "all_diag")
_FIT_ON = ("momentum", "gradient")
_DEFAULT_MAX_SIZE_DENSE = 8192
_DEFAULT_MIN_NDIM_DENSE = 2
_DEFAULT_MAX_SKEW_DENSE = 1.0
_PROCRUSTES_MAX_STEP = 0.25
_ASYMMETRY_TOLERANCE = 1e-3


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


def precond_update_prob_schedule(
    max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001, flat_start: int = 500
) -> optax.Schedule:
  """Probability of refitting the preconditioner: flat at ``max_prob``, then exponential decay.

  ``p(t) = clip(max_prob * exp(-decay * (t - flat_start)), min_prob, max_prob)``: with the
  defaults, 1 for 500 steps, then decaying to 0.03 by about step 4000.

  Args:
    max_prob: probability during the flat start.
    min_prob: floor reached after the decay.
    decay: exponential decay rate per step after ``flat_start``.
    flat_start: number of steps at ``max_prob``.

  Returns:
    An optax schedule of the step count.

  Example:
    >>> import optax_rlx
    >>> p = optax_rlx.precond_update_prob_schedule()
    >>> print(f"{p(0):.2f} {p(500):.2f} {p(1500):.3f} {p(10_000):.2f}")
    1.00 1.00 0.368 0.03
  """
  check = _common.check_number
  owner = "precond_update_prob_schedule"
  check(owner, "max_prob", max_prob, low=0.0, high=1.0, low_open=True)
  check(owner, "min_prob", min_prob, low=0.0, high=max_prob, low_open=True)
  check(owner, "decay", decay, low=0.0)
  check(owner, "flat_start", flat_start, low=0.0)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    return jnp.clip(max_prob * jnp.exp(-decay * (t - flat_start)), min_prob, max_prob)

  return schedule


# ---------------------------------------------------------------------------------------------
# Per-leaf plan and tensor helpers (all on one unstacked tensor, in float32 or wider).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one leaf's preconditioner."""

  shape: tuple[int, ...]  # the tensor (block) the factors act on; scalars become (1,)
  dense: tuple[bool, ...]  # per axis: dense factor (True) or diagonal (False)
  stacked: bool  # leading axis of the leaf is a stack of layers (vmapped)
  leaf_shape: tuple[int, ...]  # the leaf's own shape
  blocks: tuple[int, ...]  # per axis of the (unstacked) leaf: number of equal blocks (1: whole)

  @property
  def blocked(self) -> bool:
    return any(b > 1 for b in self.blocks)

  @property
  def batched(self) -> bool:
    """Whether the factors carry a leading axis (layers and/or blocks) and the fit is vmapped."""
    return self.stacked or self.blocked

  @property
  def lead(self) -> tuple[int, ...]:
    if not self.batched:
      return ()
    layers = self.leaf_shape[0] if self.stacked else 1
    return (layers * int(np.prod(self.blocks)),)


def _block_count(d, block_size):
  """Fewest equal blocks of size <= ``block_size`` an axis of size ``d`` splits into."""
  if block_size is None or d <= block_size:
    return 1
  return next(n for n in range(-(-d // block_size), d + 1) if d % n == 0)


def _make_plan(shape, stacked, max_size, min_ndim, max_skew, memory_save_mode, path,
               block_size=None):
  leaf_shape = tuple(shape)
  if stacked:
    if len(shape) == 0:
      raise ValueError(
          f"{_OWNER}: leaf {path} is declared in `stacked_layers` but is a scalar; a stacked "
          f"leaf needs a leading layer axis."
      )
    shape = shape[1:]
  shape = tuple(shape) if len(shape) else (1,)
  blocks = tuple(_block_count(d, block_size) for d in shape)
  shape = tuple(d // n for d, n in zip(shape, blocks, strict=True))
  numel = int(np.prod(shape))
  ndim = len(shape)
  diag_axes = set()
  if memory_save_mode == "all_diag":
    diag_axes = set(range(ndim))
  elif memory_save_mode == "one_diag":
    diag_axes = {int(np.argsort(np.asarray(shape), kind="stable")[-1])}
  dense = tuple(
      i not in diag_axes
      and 1 < d <= max_size
      and ndim >= min_ndim
      and d * d <= max_skew * numel
      for i, d in enumerate(shape)
  )
  return _Plan(shape=shape, dense=dense, stacked=stacked, leaf_shape=leaf_shape, blocks=blocks)


def _to_inner(x, plan):
  """A leaf-shaped ``x`` as ``plan.lead + plan.shape``: layers and blocks on one leading axis."""
  layers = (plan.leaf_shape[0],) if plan.stacked else ()
  full = tuple(d * n for d, n in zip(plan.shape, plan.blocks, strict=True))
  x = x.reshape(layers + full)
  if not plan.blocked:
    return x
  k = len(layers)
  split = layers + tuple(v for n, d in zip(plan.blocks, plan.shape, strict=True) for v in (n, d))
  x = x.reshape(split)
  r = len(plan.shape)
  block_index_axes = tuple(k + 2 * i for i in range(r))
  within_block_axes = tuple(k + 2 * i + 1 for i in range(r))
  perm = tuple(range(k)) + block_index_axes + within_block_axes
  return x.transpose(perm).reshape(plan.lead + plan.shape)


def _from_inner(u, plan):
  """Inverse of :func:`_to_inner`: back to the leaf's shape."""
  if plan.blocked:
    layers = (plan.leaf_shape[0],) if plan.stacked else ()
    k, r = len(layers), len(plan.shape)
    u = u.reshape(layers + plan.blocks + plan.shape)
    perm = tuple(range(k)) + tuple(v for i in range(r) for v in (k + i, k + r + i))
    u = u.transpose(perm)
  return u.reshape(plan.leaf_shape)


def _axis_shape(ndim, axis, size):
  return tuple(size if k == axis else 1 for k in range(ndim))


def _apply_on_axis(factor, x, axis, dense):
  """``factor`` (dense ``(n, n)`` or diagonal ``(n,)``) applied along ``axis`` of ``x``."""
  if not dense:
    return x * factor.reshape(_axis_shape(x.ndim, axis, factor.shape[0]))
  if axis == 0:
    return jnp.tensordot(factor, x, axes=(1, 0))
  if axis == x.ndim - 1:
    return jnp.tensordot(x, factor, axes=(axis, 1))
  return jnp.moveaxis(jnp.tensordot(factor, x, axes=(1, axis)), 0, axis)


def _gram(x, axis, dense):
  """``x`` contracted with itself over every axis but ``axis``: ``(n, n)``, or its diagonal."""
  others = tuple(k for k in range(x.ndim) if k != axis)
  if dense:
    return jax.lax.dot_general(x, x, ((others, others), ((), ())))
  return jnp.sum(x * x, axis=others)


def _solve_transposed(factor, x, axis, dense):
  """``Q_i⁻ᵀ`` applied along ``axis`` of ``x`` (a triangular solve for a dense factor)."""
  if not dense:
    return x / factor.reshape(_axis_shape(x.ndim, axis, factor.shape[0]))
  solve = jax.lax.linalg.triangular_solve
  if axis == x.ndim - 1:  # x Q⁻¹: solve y Q = x on the right, no transposes
    flat = x.reshape(-1, x.shape[-1])
    return solve(factor, flat, left_side=False, lower=False).reshape(x.shape)
  moved = jnp.moveaxis(x, axis, 0)
  flat = moved.reshape(moved.shape[0], -1)
  solved = solve(factor, flat, left_side=True, lower=False, transpose_a=True)
  return jnp.moveaxis(solved.reshape(moved.shape), 0, axis)


def _precondition(factors, x, dense):
  """``P x`` with ``P = Qᵀ Q``: each factor applied as ``Q_iᵀ Q_i`` on its axis.

  A dense factor of size ``n`` is applied as ``Q_iᵀ (Q_i x)`` (``4 n · numel`` flops) when
  ``n² > numel``, else through ``P_i = Q_iᵀ Q_i`` (``2 n³ + 2 n · numel`` flops).
  """
  for axis, (q, is_dense) in enumerate(zip(factors, dense, strict=True)):
    if not is_dense:
      x = _apply_on_axis(q * q, x, axis, False)
    elif q.shape[0] ** 2 > x.size:
      x = _apply_on_axis(q.T, _apply_on_axis(q, x, axis, True), axis, True)
    else:
      x = _apply_on_axis(q.T @ q, x, axis, True)
  return x


def _upper_matmul(a, b, min_block=512):
  """``a @ b`` for upper-triangular ``a`` and ``b``, skipping the zero blocks (half the flops).

  Splits in 2 x 2 blocks recursively while blocks stay >= ``min_block``:
  ``[[a11, a12], [0, a22]] @ [[b11, b12], [0, b22]]``
  ``= [[a11 b11, a11 b12 + a12 b22], [0, a22 b22]]``.
  """
  n = a.shape[0]
  if n < 2 * min_block:
    return a @ b
  h = n // 2
  top_left = _upper_matmul(a[:h, :h], b[:h, :h], min_block)
  bottom_right = _upper_matmul(a[h:, h:], b[h:, h:], min_block)
  top_right = a[:h, :h] @ b[:h, h:] + a[:h, h:] @ b[h:, h:]
  bottom_left = jnp.zeros((n - h, h), a.dtype)
  return jnp.block([[top_left, top_right], [bottom_left, bottom_right]])


def _norm_lower_bound(a):
  """A cheap lower bound of the spectral norm of a symmetric matrix (two power iterations)."""
  scale = jnp.max(jnp.abs(a))
  safe = jnp.where(scale > 0, scale, 1.0)
  a = a / safe
  tiny = jnp.finfo(a.dtype).tiny
  x = jnp.take(a, jnp.argmax(jnp.sum(a * a, axis=1)), axis=0)
  for _ in range(2):
    x = x / (jnp.linalg.norm(x) + tiny)
    x = a @ x
  x = x / (jnp.linalg.norm(x) + tiny)
  return jnp.where(scale > 0, safe * jnp.linalg.norm(a @ x), 0.0)


def _unfold(x, axis):
  """The mode-``axis`` unfolding ``(n, numel / n)``: its Gram matrix is ``_gram(x, axis, True)``."""
  moved = jnp.moveaxis(x, axis, 0)
  return moved.reshape(moved.shape[0], -1)


def _norm_lower_bound_gram(z):
  """Like ``_norm_lower_bound(z zᵀ)`` without forming ``z zᵀ`` (for tall, thin ``z``)."""
  scale = jnp.max(jnp.abs(z))
  safe = jnp.where(scale > 0, scale, 1.0)
  z = z / safe
  tiny = jnp.finfo(z.dtype).tiny
  x = jnp.take(z, jnp.argmax(jnp.sum(z * z, axis=0)), axis=1)
  for _ in range(2):
    x = x / (jnp.linalg.norm(x) + tiny)
    x = z @ (z.T @ x)
  x = x / (jnp.linalg.norm(x) + tiny)
  return jnp.where(scale > 0, safe * safe * jnp.linalg.norm(z @ (z.T @ x)), 0.0)


def _rotation_step(tr_rq, tr_rrq):
  """Step ``a`` maximising ``tr((I + aR + a²R²/2) q)``: ``-tr(Rq)/tr(R²q)``, capped at 1/4."""
  safe = jnp.where(tr_rrq < 0, tr_rrq, -1.0)
  a = jnp.where(tr_rrq < 0, jnp.minimum(-tr_rq / safe, _PROCRUSTES_MAX_STEP), _PROCRUSTES_MAX_STEP)
  return jnp.where(tr_rq > 0, a, 0.0)


def _procrustes_rotation(q):
  """Rotates ``q`` towards symmetric positive definite (online orthogonal Procrustes step).

  ``q ← U q`` with ``U = exp(a R) ≈ I + aR + (aR)²/2``, ``R = qᵀ - q`` normalised to unit
  Frobenius norm, and ``a ≤ 1/4`` from an exact line search of ``tr(U q)`` along the quadratic
  model. ``U`` is orthogonal to fourth order, so ``P = qᵀ q`` is preserved.
  """
  r = q.T - q
  r = r / (jnp.linalg.norm(r) + jnp.finfo(q.dtype).tiny)
  rq = r @ q
  rrq = r @ rq
  a = _rotation_step(jnp.trace(rq), jnp.trace(rrq))
  return q + a * (rq + 0.5 * a * rrq)


def _procrustes_rotation_factored(q, left, right):
  """``_procrustes_rotation`` with the skew generator ``R = left @ rightᵀ`` kept factored.

  ``left`` and ``right`` are ``(n, m)`` with ``m < n``: ``R q = left (rightᵀ q)`` and
  ``R² q = left ((rightᵀ left)(rightᵀ q))`` cost ``O(n² m)`` instead of ``O(n³)``.
  """
  tiny = jnp.finfo(q.dtype).tiny
  # ‖R‖_F² = Σ (leftᵀ left) ⊙ (rightᵀ right) suffers cancellation when R is small next to its
  # factors: below 1e-3 of ‖left‖ ‖right‖ it is round-off, and no rotation is taken.
  fro = jnp.sqrt(jnp.maximum(jnp.sum((left.T @ left) * (right.T @ right)), 0.0))
  meaningful = fro > 1e-3 * jnp.linalg.norm(left) * jnp.linalg.norm(right)
  inv = jnp.where(meaningful, 1.0 / (fro + tiny), 0.0)
  c = (right.T @ q) * inv  # R q = left c
  mc = ((right.T @ left) * inv) @ c  # R² q = left mc
  a = _rotation_step(jnp.sum(left * c.T), jnp.sum(left * mc.T))
  return q + left @ (a * c + 0.5 * a * a * mc)


def _balance(factors):
  """Rescales factors to equal max-abs (their geometric mean); ``Q`` itself is unchanged."""
  if len(factors) < 2:
    return factors
  norms = jnp.stack([jnp.max(jnp.abs(q)) for q in factors])
  ok = jnp.all(norms > 0) & jnp.all(jnp.isfinite(norms))
  safe = jnp.where(ok, norms, 1.0)
  gmean = jnp.exp(jnp.mean(jnp.log(safe)))
  return tuple(q * (gmean / n) for q, n in zip(factors, safe, strict=True))


def _initial_scale(h, v):
  """Scale of Q from the first fitting pair: (mean h⁴ / mean v⁴)^(-1/8), 1 if undefined."""
  h4 = jnp.mean(h**4)
  v4 = 1.0 if v is None else jnp.mean(v**4)
  ok = (h4 > 0) & jnp.isfinite(h4) & (v4 > 0)
  ratio = jnp.where(ok, h4 / jnp.where(ok, v4, 1.0), 1.0)
  scale = ratio ** (-1.0 / 8.0)
  return jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1.0)


@dataclasses.dataclass(frozen=True)
class _FitConfig:
  geometry: str
  criterion: str
  damping: Any
  lipschitz_decay: Any
  auto_init: bool


def _refit_leaf(factors, lips, h, v, noise, lr, first_step, plan, cfg):
  """One Lie-group step of every factor of one (unstacked) tensor.

  Args:
    factors: tuple of factors in the compute dtype.
    lips: tuple of float32 Lipschitz estimates.
    h: the fitting target: gradient/momentum (whitening) or Hessian-vector product (newton).
    v: the probe of the Hessian-vector product (newton), or None (whitening).
    noise: standard normal tensor like ``h``.
    lr: the preconditioner learning rate μ.
    first_step: bool scalar; with ``cfg.auto_init`` the factors are first rescaled from (h, v).
    plan: the leaf's static plan.
    cfg: static fitting configuration.

  Returns:
    The new factors and Lipschitz estimates.
  """
  dense = plan.dense
  order = len(factors)
  if cfg.auto_init:
    scale = jnp.where(first_step, _initial_scale(h, v), 1.0) ** (1.0 / order)
    factors = tuple(q * scale.astype(q.dtype) for q in factors)
  eps = jnp.finfo(h.dtype).eps
  damped = h + (cfg.damping + eps * jnp.abs(h)) * noise
  numel = h.size
  if cfg.geometry == "triangular":
    probe = noise if v is None else v  # whitening: v is the damping noise itself (independent of h)
    a = damped
    for axis, (q, is_dense) in enumerate(zip(factors, dense, strict=True)):
      a = _apply_on_axis(q, a, axis, is_dense)
    b = probe
    for axis, (q, is_dense) in enumerate(zip(factors, dense, strict=True)):
      b = _solve_transposed(q, b, axis, is_dense)
  else:
    a = _precondition(factors, damped, dense)
    b = v
  new_factors, new_lips = [], []
  for axis, (q, lip, is_dense) in enumerate(zip(factors, lips, dense, strict=True)):
    n = q.shape[0]
    # term1 = Y Yᵀ has rank <= numel / n: for a procrustes step with numel / n < n / 2,
    # (term1 - term2) Q is applied through the unfoldings (4 n² k flops instead of 2 n³).
    low_rank = is_dense and cfg.geometry == "procrustes" and 2 * numel < n * n
    if low_rank:
      y = _unfold(a, axis)
      z = y if b is None else jnp.concatenate([y, _unfold(b, axis)], axis=1)
      term2_scalar = numel / n if b is None else 0.0
      bound = _norm_lower_bound_gram(z) + term2_scalar
    else:
      term1 = _gram(a, axis, is_dense)
      if b is None:  # whitening with E[v vᵀ] = I integrated out: term2 = (numel / n) I
        term2_scalar = numel / n
        term2 = term2_scalar * (jnp.eye(n, dtype=q.dtype) if is_dense else 1.0)
        bound = (_norm_lower_bound(term1) if is_dense else jnp.max(term1)) + term2_scalar
      else:
        term2 = _gram(b, axis, is_dense)
        total = term1 + term2
        bound = _norm_lower_bound(total) if is_dense else jnp.max(total)
    bound = bound.astype(jnp.float32)
    lip = jnp.maximum(cfg.lipschitz_decay * lip + (1.0 - cfg.lipschitz_decay) * bound, bound)
    step = (lr / jnp.maximum(lip, jnp.finfo(jnp.float32).tiny)).astype(q.dtype)
    if low_rank:
      # q ← c q - step (Y Yᵀ q - V Vᵀ q): its new asymmetry qᵀ - q is (up to scale and the small
      # residual left by earlier rotations) Y W_yᵀ - W_y Yᵀ - V W_vᵀ + W_v Vᵀ with W = qᵀ Y, qᵀ V.
      w_y = q.T @ y
      diff_q = y @ w_y.T - term2_scalar * q
      left, right = [y, w_y], [w_y, -y]
      if b is not None:
        v_unf = _unfold(b, axis)
        w_v = q.T @ v_unf
        diff_q = diff_q - v_unf @ w_v.T
        left, right = [*left, v_unf, w_v], [*right, -w_v, v_unf]
      q = q - step * diff_q
      left, right = jnp.concatenate(left, axis=1), jnp.concatenate(right, axis=1)
      if left.shape[1] * 2 <= n:
        q = _procrustes_rotation_factored(q, left, right)
        # The factored generator leaves earlier residual asymmetry alone; a full rotation
        # removes it once it exceeds _ASYMMETRY_TOLERANCE (relative Frobenius norm).
        asymmetry = jnp.linalg.norm(q.T - q) / (jnp.linalg.norm(q) + jnp.finfo(q.dtype).tiny)
        q = jax.lax.cond(
            asymmetry > _ASYMMETRY_TOLERANCE, _procrustes_rotation, lambda x: x, q
        )
      else:
        q = _procrustes_rotation(q)
    elif is_dense and cfg.geometry == "triangular":
      q = q - step * _upper_matmul(jnp.triu(term1 - term2), q)
    elif is_dense:
      q = _procrustes_rotation(q - step * ((term1 - term2) @ q))
    else:
      q = q - step * (term1 - term2) * q
    new_factors.append(q)
    new_lips.append(lip)
  return _balance(tuple(new_factors)), tuple(new_lips)


def _factor_tuple(factors):
  """A leaf's factors as a tuple. Containers that rebuild pytrees (``flax.nnx.Optimizer`` keeps
  optimizer state as ``nnx.State``) can hand them back as a mapping ``{0: Q_1, 1: Q_2, ...}``."""
  if isinstance(factors, Mapping):
    return tuple(factors[k] for k in sorted(factors))
  return tuple(factors)


def _maybe_vmap(fn, stacked, in_axes=0):
  return jax.vmap(fn, in_axes=in_axes) if stacked else fn


# ---------------------------------------------------------------------------------------------
# The transform.
# ---------------------------------------------------------------------------------------------


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{_OWNER}: unknown `{name}` {value!r}; expected one of {choices}.")


def _as_key_data(key):
  """``key`` as raw uint32 key data; concrete keys become NumPy (no device or mesh attached, so a
  transformation built under one mesh works under another)."""
  data = _key_data(key)
  return data if _common.is_traced(data) else np.asarray(data)


def _key_data(key):
  if isinstance(key, int | np.integer) and not isinstance(key, bool):
    return jax.random.key_data(jax.random.key(int(key)))
  if _common.is_traced(key) and jnp.issubdtype(key.dtype, jnp.integer) and key.ndim == 0:
    return jax.random.key_data(jax.random.key(key))
  if isinstance(key, jax.Array | np.ndarray):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(key)
    if jnp.issubdtype(key.dtype, jnp.integer) and key.ndim == 0:
      return jax.random.key_data(jax.random.key(key))
    if key.dtype == jnp.uint32 and key.ndim == 1:
      return jnp.asarray(key)
  raise ValueError(
      f"{_OWNER}: `key` must be an int or a JAX PRNG key (typed or raw uint32), got {key!r}."
  )


def _resolve_stacked(stacked_layers, params):
  if stacked_layers is None:
    return [False] * len(jax.tree.leaves(params))
  mask = _common.resolve_mask(stacked_layers, params)
  return jax.tree.leaves(mask)


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
  check = _common.check_number
  check(_OWNER, "b1", b1, low=0.0, high=1.0, high_open=True, allow_none=True)
  check(_OWNER, "precond_lr", precond_lr, low=0.0, low_open=True, allow_schedule=True)
  check(_OWNER, "precond_update_prob", precond_update_prob, low=0.0, high=1.0, low_open=True,
        allow_none=True, allow_schedule=True)
  check(_OWNER, "precond_init_scale", precond_init_scale, low=0.0, low_open=True, allow_none=True)
  check(_OWNER, "damping", damping, low=0.0)
  check(_OWNER, "lipschitz_decay", lipschitz_decay, low=0.0, high=1.0, high_open=True)
  check(_OWNER, "update_clip", update_clip, low=0.0, low_open=True, allow_none=True)
  check(_OWNER, "max_skew_dense", max_skew_dense, low=0.0, low_open=True, allow_none=True,
        allow_inf=True)
  _check_choice("criterion", criterion, _CRITERIA)
  _check_choice("geometry", geometry, _GEOMETRIES)
  _check_choice("precond_fit_on", precond_fit_on, _FIT_ON)
  _check_choice("memory_save_mode", memory_save_mode, _MEMORY_SAVE_MODES)
  _common.check_bool(_OWNER, "nesterov", nesterov)
  max_size = (
      _DEFAULT_MAX_SIZE_DENSE
      if max_size_dense is None
      else _common.static_int(_OWNER, "max_size_dense", max_size_dense, low=1)
  )
  min_ndim = (
      _DEFAULT_MIN_NDIM_DENSE
      if min_ndim_dense is None
      else _common.static_int(_OWNER, "min_ndim_dense", min_ndim_dense, low=0)
  )
  block = (
      None if block_size is None else _common.static_int(_OWNER, "block_size", block_size, low=1)
  )
  if max_skew_dense is None:
    max_skew = _DEFAULT_MAX_SKEW_DENSE
  elif _common.is_traced(max_skew_dense):
    raise ValueError(
        f"{_OWNER}: `max_skew_dense` decides the state's shapes and must be static; with "
        f"`optax.inject_hyperparams`, pass `static_args=('max_skew_dense',)`."
    )
  else:
    max_skew = float(max_skew_dense)
  _common.check_float_dtype(_OWNER, "mu_dtype", mu_dtype)
  _common.check_float_dtype(_OWNER, "precond_dtype", precond_dtype)
  key_data = _as_key_data(key)
  use_momentum = b1 is not None and not _common.is_zero(b1)
  update_prob = precond_update_prob_schedule() if precond_update_prob is None else (
      precond_update_prob
  )
  fit_cfg = _FitConfig(
      geometry=geometry,
      criterion=criterion,
      damping=damping,
      lipschitz_decay=lipschitz_decay,
      auto_init=precond_init_scale is None,
  )

  def plans_for(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    stacked = _resolve_stacked(stacked_layers, tree)
    return [
        _make_plan(tuple(x.shape), bool(s), max_size, min_ndim, max_skew, memory_save_mode,
                   _common.path_str(path), block)
        for (path, x), s in zip(leaves, stacked, strict=True)
    ]

  def factor_dtype(param_dtype):
    return jnp.dtype(precond_dtype) if precond_dtype is not None else _common.stats_dtype(
        param_dtype
    )

  def init_fn(params):
    _common.check_real_float_leaves(_OWNER, params, "params")
    mu = _common.momentum_like(params, mu_dtype) if use_momentum else ()
    params, _ = _common.split_variables(params)  # factors never take a param's NNX metadata
    treedef = jax.tree.structure(params)
    leaves = jax.tree.leaves(params)
    scale = 1.0 if precond_init_scale is None else precond_init_scale
    qs, ls = [], []
    for p, plan in zip(leaves, plans_for(params), strict=True):
      dtype = factor_dtype(p.dtype)
      per_factor = jnp.asarray(scale, jnp.float32) ** (1.0 / len(plan.shape))
      factors = tuple(
          (per_factor * (jnp.eye(d) if is_dense else jnp.ones(d))).astype(dtype)
          for d, is_dense in zip(plan.shape, plan.dense, strict=True)
      )
      lips = tuple(jnp.zeros([], jnp.float32) for _ in plan.shape)
      if plan.batched:
        # One set of factors per layer and block. A layer's factors live with that layer: under
        # an explicit-axes mesh they take the param's sharding of the layer axis (see
        # state_sharding for Auto meshes); blocks' factors are replicated.
        n = plan.lead[0]
        lay_out = (
            functools.partial(_common.layout_like, param=p, lead=True)
            if plan.stacked and not plan.blocked else lambda x: x
        )
        factors = tuple(lay_out(jnp.broadcast_to(q, (n, *q.shape))) for q in factors)
        lips = tuple(lay_out(jnp.zeros((n,), jnp.float32)) for _ in lips)
      qs.append(factors)
      ls.append(lips)
    return KronState(
        count=jnp.zeros([], jnp.int32),
        key=jnp.asarray(key_data),
        precond_acc=jnp.ones([], jnp.float32),
        mu=mu,
        Qs=treedef.unflatten(qs),
        Ls=treedef.unflatten(ls),
    )

  def check_state(updates, state, params):
    if not isinstance(state, KronState):
      raise ValueError(f"{_OWNER}: expected a KronState, got {type(state).__name__}.")
    _common.check_real_float_leaves(_OWNER, updates, "the updates")
    treedef = jax.tree.structure(updates)
    try:
      qs = [_factor_tuple(f) for f in treedef.flatten_up_to(state.Qs)]
    except (ValueError, TypeError):
      _common.check_same_structure(
          _OWNER, jax.tree.map(lambda _: 0, state.Qs, is_leaf=lambda x: isinstance(x, tuple)),
          "the optimizer state", updates, "the updates",
      )
      raise
    if params is not None:
      _common.check_same_shapes(_OWNER, params, "the params", updates, "the updates")
    plans = plans_for(updates)
    for (path, g), plan, factors in zip(
        jax.tree_util.tree_flatten_with_path(updates)[0], plans, qs, strict=True
    ):
      lead = plan.lead
      expected = tuple(
          (*lead, d, d) if is_dense else (*lead, d)
          for d, is_dense in zip(plan.shape, plan.dense, strict=True)
      )
      got = tuple(tuple(q.shape) for q in factors)
      if got != expected:
        raise ValueError(
            f"{_OWNER}: leaf {_common.path_str(path)} has gradient shape {tuple(g.shape)}, which "
            f"does not match its preconditioner factors {got}."
        )
    return plans, treedef

  def update_fn(updates, state, params=None, obj_fn=None, **extra_args):
    del extra_args
    # NNX Variables (trees from nnx.state) are computed on as plain arrays and put back after.
    updates, rewrap_updates = _common.split_variables(updates)
    if isinstance(state, KronState):
      mu, rewrap_mu = _common.split_variables(state.mu)
      state = state._replace(mu=mu)
    if params is not None:
      params, rewrap_params = _common.split_variables(params)
      if obj_fn is not None:
        user_obj_fn = obj_fn
        obj_fn = lambda p: user_obj_fn(rewrap_params(p))  # noqa: E731
    out, new_state = run_update(updates, state, params, obj_fn)
    return rewrap_updates(out), new_state._replace(mu=rewrap_mu(new_state.mu))

  def run_update(updates, state, params, obj_fn):
    plans, treedef = check_state(updates, state, params)
    if criterion == "newton":
      if obj_fn is None:
        raise ValueError(
            f"{_OWNER}: criterion='newton' needs `obj_fn` (params -> scalar loss) passed to "
            f"`update(grads, state, params, obj_fn=...)`."
        )
      if params is None:
        raise ValueError(f"{_OWNER}: criterion='newton' needs `params` passed to `update`.")
    if any(_common.explicit_spec(g) is not None for g in jax.tree.leaves(updates)):
      # Explicit-axes mesh: run the step with the mesh axes switched to Auto, so XLA's SPMD
      # partitioner places the contractions (as under an Auto mesh: partial products and
      # all-reduces, no gather of a whole leaf), and hand back the inputs' explicit shardings.
      # Inside, no array carries explicit axes, so the step's math needs no sharding names.
      typeof = lambda tree: jax.tree.map(lambda x: jax.typeof(x).sharding, tree)  # noqa: E731
      step = jax.sharding.auto_axes(
          lambda u, s, p: update_step(u, s, p, obj_fn, plans, treedef),
          out_sharding=(typeof(updates), typeof(state)),
      )
      return step(updates, state, params)
    return update_step(updates, state, params, obj_fn, plans, treedef)

  def update_step(updates, state, params, obj_fn, plans, treedef):
    count = state.count
    count_inc = optax.safe_increment(count)
    grads = jax.tree.leaves(updates)

    if use_momentum:
      mu = jax.tree.map(
          lambda g, m: (1.0 - b1) * g + b1 * m.astype(jnp.promote_types(m.dtype, g.dtype)),
          updates, state.mu,
      )
      t = count_inc.astype(jnp.float32)
      debias = 1.0 - b1**t
      if nesterov:
        debias_next = 1.0 - b1 ** (t + 1.0)
        m_hat = jax.tree.map(
            lambda m, g: b1 * m / debias_next + (1.0 - b1) * g / debias, mu, updates
        )
      else:
        m_hat = jax.tree.map(lambda m: m / debias, mu)
      new_mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
      m_hat = jax.tree.leaves(m_hat)
    else:
      new_mu = state.mu
      m_hat = grads

    prob = jnp.clip(jnp.asarray(_common.schedule_value(update_prob, count), jnp.float32), 0, 1)
    acc = state.precond_acc + prob
    do_refit = acc >= 1.0
    new_acc = jnp.where(do_refit, acc - 1.0, acc)
    key, refit_key = jax.random.split(jax.random.wrap_key_data(state.key))
    lr = jnp.asarray(_common.schedule_value(precond_lr, count), jnp.float32)
    fit_targets = m_hat if precond_fit_on == "momentum" else grads
    qs = [_factor_tuple(f) for f in treedef.flatten_up_to(state.Qs)]
    ls = [_factor_tuple(f) for f in treedef.flatten_up_to(state.Ls)]
    param_leaves = jax.tree.leaves(params) if params is not None else None

    def refit(qs, ls):
      keys = jax.random.split(refit_key, 2 * len(grads))
      if criterion == "newton":
        probes = [
            jax.random.normal(k, p.shape, p.dtype)
            for k, p in zip(keys[len(grads) :], param_leaves, strict=True)
        ]
        tangent = treedef.unflatten(probes)
        targets = jax.tree.leaves(jax.jvp(jax.grad(obj_fn), (params,), (tangent,))[1])
      else:
        targets, probes = fit_targets, [None] * len(grads)
      out_q, out_l = [], []
      for plan, factors, lips, h, v, k in zip(
          plans, qs, ls, targets, probes, keys[: len(grads)], strict=True
      ):
        if h.size == 0:  # an empty leaf has nothing to fit
          out_q.append(factors)
          out_l.append(lips)
          continue
        compute = _common.stats_dtype(h.dtype)
        h32 = _to_inner(h.astype(compute), plan)
        v32 = None if v is None else _to_inner(v.astype(compute), plan)
        noise = jax.random.normal(k, plan.lead + plan.shape, compute)
        f32 = tuple(q.astype(compute) for q in factors)

        def fit(f, lp, hh, vv, nn, plan=plan):
          return _refit_leaf(f, lp, hh, vv, nn, lr, count == 0, plan, fit_cfg)

        in_axes = (0, 0, 0, None if v32 is None else 0, 0)
        new_f, new_l = _maybe_vmap(fit, plan.batched, in_axes)(f32, lips, h32, v32, noise)
        out_q.append(tuple(q.astype(old.dtype) for q, old in zip(new_f, factors, strict=True)))
        out_l.append(tuple(new_l))
      return out_q, out_l

    if isinstance(update_prob, int | float) and update_prob >= 1.0:
      qs, ls = refit(qs, ls)  # refit every step: no conditional (XLA runs it faster unwrapped)
    else:
      qs, ls = jax.lax.cond(do_refit, refit, lambda q, lips: (q, lips), qs, ls)

    out = []
    for plan, factors, m, g in zip(plans, qs, m_hat, grads, strict=True):
      if g.size == 0:
        out.append(jnp.zeros_like(g))
        continue
      compute = _common.stats_dtype(m.dtype)
      def apply(f, x, plan=plan, compute=compute):
        u = _precondition(tuple(q.astype(compute) for q in f), x, plan.dense)
        if update_clip is not None:
          u = u / jnp.maximum(1.0, jnp.sqrt(jnp.mean(u * u)) / update_clip)
        return u

      u = _maybe_vmap(apply, plan.batched)(factors, _to_inner(m.astype(compute), plan))
      out.append(_from_inner(u, plan).astype(g.dtype))

    new_state = KronState(
        count=count_inc,
        key=jax.random.key_data(key),
        precond_acc=new_acc,
        mu=new_mu,
        Qs=treedef.unflatten(qs),
        Ls=treedef.unflatten(ls),
    )
    return treedef.unflatten(out), new_state

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
  _common.check_number(_OWNER, "learning_rate", learning_rate, low=0.0, allow_schedule=True)
  _common.check_number(_OWNER, "weight_decay", weight_decay, low=0.0)
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
