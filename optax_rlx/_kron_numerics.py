"""Kron's numerics on one fitting unit: pure functions of arrays, no optax and no pytrees.

A fitting unit is a tensor ``x`` of shape ``(d_1, ..., d_r)`` with one factor ``Q_i`` per axis:
dense ``(d_i, d_i)`` or diagonal ``(d_i,)`` (``dense[i]``), ``Q = Q_1 ⊗ ... ⊗ Q_r`` and
``P = Qᴴ Q``. Everything runs in the dtype of its inputs (float32 or wider; the transform casts).
Complex units have complex dense factors (``ᴴ`` is the conjugate transpose, a plain transpose for
real ones) and real positive diagonal factors; Gram terms are ``A Aᴴ``, norms and traces real.

Here: applying factors, Gram terms and their norms, exact power-of-two scaling, the fitting
pair's normalisation (:func:`normalise_pair`) and the step shared by every geometry (diagonal
factors, Lipschitz estimates), the initial scale, balancing, and random signs. What differs
between geometries is :mod:`optax_rlx._kron_geometry`.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from optax_rlx._common import abs2 as _abs2
from optax_rlx._common import real_dtype

Factors = tuple[jax.Array, ...]
"""A unit's factors, one per axis: ``(n, n)`` dense or ``(n,)`` diagonal."""

Dense = tuple[bool, ...]
"""Per axis, whether its factor is dense."""


class Pair(NamedTuple):
  """A fitting pair divided by one power of two ``2^e`` (:func:`normalise_pair`).

  Attributes:
    a: ``A / 2^e`` (``A = Q h`` or ``P h``, per geometry).
    b: ``B / 2^e``, or None when ``E[v vᴴ] = I`` is integrated out (procrustes whitening).
    probe_variance: with ``b`` None, ``4^-e``: the variance of the integrated-out probe on the
      same scale, whose Gram term along an axis of size ``n`` is ``probe_variance · numel / n ·
      I``; None otherwise.
  """

  a: jax.Array
  b: jax.Array | None
  probe_variance: jax.Array | None


class StepSize(NamedTuple):
  """A factor step's size: ``precond_lr`` μ over a Lipschitz estimate with decay ``β_L``."""

  lr: jax.Array
  lipschitz_decay: jax.Array


def normalise_pair(a: jax.Array, b: jax.Array | None) -> tuple[Pair, jax.Array]:
  """``(Pair, e)``: ``a`` and ``b`` divided by a power of two ``2^e >= max |entry|`` (``>= 1``
  when ``b`` is None), so Gram terms cannot overflow and every step sees them scaled by exactly
  ``4^-e``; Lipschitz estimates move to and from that scale by :func:`ldexp` with ``∓2e``."""
  if b is not None:
    e = jnp.maximum(pow2_exponent(a), pow2_exponent(b))
    return Pair(ldexp(a, -e), ldexp(b, -e), None), e
  e = jnp.maximum(pow2_exponent(a), 0)
  return Pair(ldexp(a, -e), None, ldexp(jnp.ones([], real_dtype(a.dtype)), -2 * e)), e


def lipschitz_step(lip: jax.Array, bound: jax.Array, size: StepSize,
                   dtype: DTypeLike) -> tuple[jax.Array, jax.Array]:
  """``L ← max(β_L L + (1 − β_L) ℓ, ℓ)`` and the step ``μ / L``; returns ``(L, μ / L)``."""
  bound = bound.astype(jnp.float32)
  decay = size.lipschitz_decay
  lip = jnp.maximum(decay * lip + (1.0 - decay) * bound, bound)
  return lip, (size.lr / jnp.maximum(lip, jnp.finfo(jnp.float32).tiny)).astype(dtype)


def probe_term(pair: Pair, n: int, dtype: DTypeLike) -> jax.Array:
  """The integrated-out probe's Gram scalar ``probe_variance · numel / n`` along an axis of
  size ``n``."""
  assert pair.probe_variance is not None  # set whenever the probe is integrated out
  return (pair.probe_variance * (pair.a.size / n)).astype(real_dtype(dtype))


def diagonal_step(q: jax.Array, lip: jax.Array, pair: Pair, axis: int,
                  size: StepSize) -> tuple[jax.Array, jax.Array]:
  """``q ← q (1 − (μ/L)(diag term1 − diag term2))`` for a diagonal factor ``q`` of ``(n,)``;
  the same in every geometry."""
  term1 = gram(pair.a, axis, False)
  if pair.b is None:
    term2 = probe_term(pair, q.shape[0], q.dtype)
    bound = jnp.max(term1) + term2
  else:
    term2 = gram(pair.b, axis, False)
    bound = jnp.max(term1 + term2)
  lip, step = lipschitz_step(lip, bound, size, q.dtype)
  return q - step * (term1 - term2) * q, lip


# ---------------------------------------------------------------------------------------------
# Applying factors.
# ---------------------------------------------------------------------------------------------


def precondition(factors: Factors, x: jax.Array, dense: Dense) -> jax.Array:
  """``P x`` with ``P = Qᴴ Q``: each factor applied as ``Q_iᴴ Q_i`` on its axis.

  A dense factor of size ``n`` is applied as ``Q_iᴴ (Q_i x)`` (``4 n · numel`` flops) when
  ``n² > numel``, else through ``P_i = Q_iᴴ Q_i`` (``2 n³ + 2 n · numel`` flops). A diagonal
  factor is applied twice, ``(x q) q``: for a vector ``q² ≈ 1 / |x|``, which underflows to zero
  for gradients near float32's maximum while ``x q`` does not.
  """
  for axis, (q, is_dense) in enumerate(zip(factors, dense, strict=True)):
    if not is_dense:
      x = apply_on_axis(q, apply_on_axis(q, x, axis, False), axis, False)
    elif q.shape[0] ** 2 > x.size:
      x = apply_on_axis(ct(q), apply_on_axis(q, x, axis, True), axis, True)
    else:
      x = apply_on_axis(ct(q) @ q, x, axis, True)
  return x


def precond_factors(factors: Factors, dense: Dense) -> Factors:
  """Per axis the factor of ``P = P_1 ⊗ ... ⊗ P_r``: ``P_i = Q_iᴴ Q_i`` (dense) or ``q_i²``."""
  return tuple(ct(q) @ q if d else q * q for q, d in zip(factors, dense, strict=True))


def apply_precond(precond: Factors, x: jax.Array, dense: Dense) -> jax.Array:
  """``P x`` from the factors of :func:`precond_factors` (``2 n · numel`` flops per dense one)."""
  for axis, (p, is_dense) in enumerate(zip(precond, dense, strict=True)):
    x = apply_on_axis(p, x, axis, is_dense)
  return x


def apply_on_axis(factor: jax.Array, x: jax.Array, axis: int, dense: bool) -> jax.Array:
  """``factor`` (dense ``(n, n)`` or diagonal ``(n,)``) applied along ``axis`` of ``x``."""
  if not dense:
    return x * factor.reshape(axis_shape(x.ndim, axis, factor.shape[0]))
  if axis == 0:
    return jnp.tensordot(factor, x, axes=(1, 0))
  if axis == x.ndim - 1:
    return jnp.tensordot(x, factor, axes=(axis, 1))
  return jnp.moveaxis(jnp.tensordot(factor, x, axes=(1, axis)), 0, axis)


def cast_factors(factors: Factors, dense: Dense, dtype: DTypeLike) -> Factors:
  """Factors cast to ``dtype`` (to its real part for diagonal factors, which are real)."""
  real = real_dtype(dtype)
  return tuple(q.astype(dtype if d else real) for q, d in zip(factors, dense, strict=True))


def axis_shape(ndim: int, axis: int, size: int) -> tuple[int, ...]:
  """``(1, ..., size, ..., 1)``: a vector broadcast along ``axis`` of an ``ndim`` tensor."""
  return tuple(size if k == axis else 1 for k in range(ndim))


def ct(a: jax.Array) -> jax.Array:
  """``aᴴ``: the conjugate transpose (``aᵀ`` for real ``a``)."""
  return jnp.conj(a).T


# ---------------------------------------------------------------------------------------------
# Gram terms and their norms.
# ---------------------------------------------------------------------------------------------


def gram(x: jax.Array, axis: int, dense: bool) -> jax.Array:
  """``x xᴴ`` contracted over every axis but ``axis``: ``(n, n)``, or its (real) diagonal."""
  others = tuple(k for k in range(x.ndim) if k != axis)
  if dense:
    return jax.lax.dot_general(x, jnp.conj(x), ((others, others), ((), ())))
  return jnp.sum(_abs2(x), axis=others)


def unfold(x: jax.Array, axis: int) -> jax.Array:
  """The mode-``axis`` unfolding ``(n, numel / n)``: its Gram matrix is ``gram(x, axis, True)``."""
  moved = jnp.moveaxis(x, axis, 0)
  return moved.reshape(moved.shape[0], -1)


def norm_lower_bound(a: jax.Array) -> jax.Array:
  """A cheap lower bound of ``‖a‖₂`` for Hermitian positive semidefinite ``a`` ``(n, n)``.

  ``‖a y‖ / ‖y‖`` with ``y = a² x``, ``x`` the column of ``a`` with the largest norm: two power
  iterations from ``x``, taken on ``a`` divided by its largest ``|entry|`` and with no
  normalisation between the products. None is needed: for positive semidefinite ``a`` the norms
  ``‖aᵏ x‖`` never decrease in ``k`` (they are log-convex and ``‖x‖ >= 1 >= ‖a⁰ e_j‖``), so none
  underflows, and none exceeds ``n^3.5``. Each normalisation was a reduction and a division of
  its own: without them the default update on a 4-layer GPT-2 tree compiles to 58 fewer XLA
  kernels (of 912 on the CPU, 2026-12-05).
  """
  scale = jnp.max(jnp.abs(a))
  safe = jnp.where(scale > 0, scale, 1.0)
  a = a / safe
  x = jnp.take(a, jnp.argmax(jnp.sum(_abs2(a), axis=0)), axis=1)
  y = a @ (a @ x)
  return _power_ratio(a @ y, y, scale, safe)


def norm_lower_bound_gram(z: jax.Array) -> jax.Array:
  """``norm_lower_bound(z zᴴ)`` without forming ``z zᴴ`` (for tall, thin ``z`` ``(n, k)``):
  ``x`` is the column of ``z`` with the largest norm (the same argument holds)."""
  scale = jnp.max(jnp.abs(z))
  safe = jnp.where(scale > 0, scale, 1.0)
  z = z / safe
  gram_times = lambda v: z @ (ct(z) @ v)  # noqa: E731
  x = jnp.take(z, jnp.argmax(jnp.sum(_abs2(z), axis=0)), axis=1)
  y = gram_times(gram_times(x))
  return _power_ratio(gram_times(y), y, scale, safe * safe)


def _power_ratio(ay: jax.Array, y: jax.Array, scale: jax.Array, unit: jax.Array) -> jax.Array:
  """``unit · ‖a y‖ / ‖y‖``, 0 where the matrix's largest ``|entry|`` ``scale`` is not > 0."""
  ratio = jnp.linalg.norm(ay) / jnp.maximum(jnp.linalg.norm(y), jnp.finfo(unit.dtype).tiny)
  return jnp.where(scale > 0, unit * ratio, 0.0)


# ---------------------------------------------------------------------------------------------
# Exact power-of-two scaling.
# ---------------------------------------------------------------------------------------------

_SAME_WIDTH_INT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


def pow2_exponent(x: jax.Array) -> jax.Array:
  """The int32 ``e`` with ``max|x| < 2^e <= 2 max|x|`` (0 when ``x`` is all zero or not finite).

  Dividing by ``2^e`` is exact in floating point, so scaling by it keeps every bit of ``x``.
  Read off the exponent bits of ``max|x|`` (a few integer ops, unlike ``jnp.frexp``).
  """
  m = jnp.max(jnp.abs(x)).astype(real_dtype(x.dtype))
  ok = (m > 0) & jnp.isfinite(m)
  int_dtype, nmant, bias = _float_bits(m.dtype)
  biased = (jax.lax.bitcast_convert_type(m, int_dtype) >> nmant).astype(jnp.int32)
  # A normal m = 1.f · 2^(biased - bias); a subnormal one lies below 2^(1 - bias).
  return jnp.where(ok, jnp.maximum(biased, 1) - bias + 1, 0).astype(jnp.int32)


def ldexp(x: jax.Array, e: ArrayLike) -> jax.Array:
  """``x · 2^e``, exact (barring overflow and underflow of the result), for real or complex
  ``x``: three exact multiplications by normal powers of two of the same sign of exponent."""
  real = real_dtype(x.dtype)
  e = jnp.asarray(e, jnp.int32)
  third = jax.lax.div(e, jnp.int32(3))  # truncating: one op (``//`` floors, in four or five)
  for part in (third, third, e - 2 * third):
    x = x * _exact_pow2(part, real)
  return x


def rms(x: jax.Array) -> jax.Array:
  """``sqrt(mean |x|²)`` without overflow or underflow (computed on ``x / 2^e``)."""
  e = pow2_exponent(x)
  return ldexp(jnp.sqrt(jnp.mean(_abs2(ldexp(x, -e)))), e)


def clip_by_rms(u: jax.Array, threshold: ArrayLike | None) -> jax.Array:
  """``u / max(1, RMS(u) / threshold)``; ``u`` itself when ``threshold`` is None."""
  if threshold is None:
    return u
  return u / jnp.maximum(1.0, rms(u) / threshold).astype(u.dtype)


def _float_bits(dtype: DTypeLike) -> tuple[Any, int, int]:
  """``(int dtype of the same width, mantissa bits, exponent bias)`` of a real float dtype."""
  info = jnp.finfo(dtype)
  return _SAME_WIDTH_INT[jnp.dtype(dtype).itemsize], int(info.nmant), int(info.maxexp) - 1


def _exact_pow2(e: jax.Array, dtype: DTypeLike) -> jax.Array:
  """``2^e`` in ``dtype`` for an int32 ``e`` in its normal range (built from the bits)."""
  int_dtype, nmant, bias = _float_bits(dtype)
  return jax.lax.bitcast_convert_type((e.astype(int_dtype) + bias) << nmant, dtype)


# ---------------------------------------------------------------------------------------------
# Scale of the factors: the initial scale and balancing.
# ---------------------------------------------------------------------------------------------


def scale_factors(factors: Factors, precond: Factors | None,
                  scale: jax.Array) -> tuple[Factors, Factors | None]:
  """The factors (and their cached :func:`precond_factors`, or None) times ``scale``, split
  evenly over the factors. A scale of exactly 1 leaves every bit unchanged."""
  scale = scale ** (1.0 / len(factors))
  factors = tuple(q * scale.astype(q.dtype) for q in factors)
  if precond is not None:  # (s Q_i)ᴴ (s Q_i) = s² Q_iᴴ Q_i, s real
    precond = tuple(p * jnp.square(scale).astype(p.dtype) for p in precond)
  return factors, precond


def initial_scale(h: jax.Array, v: jax.Array | None) -> jax.Array:
  """Scale of ``Q`` from the first pair: ``(mean |h|⁴ / mean |v|⁴)^(-1/8)``, 1 if undefined.

  Computed on ``h / 2^e_h`` and ``v / 2^e_v`` (:func:`pow2_exponent`), so it neither overflows
  nor underflows for any finite ``h``: ``2^((e_v - e_h) / 2) (m_h / m_v)^(-1/8)``.
  """
  e_h = pow2_exponent(h)
  e_v = jnp.int32(0) if v is None else pow2_exponent(v)
  h4 = jnp.mean(_abs4(ldexp(h, -e_h))).astype(jnp.float32)
  v4 = jnp.float32(1.0) if v is None else jnp.mean(_abs4(ldexp(v, -e_v))).astype(jnp.float32)
  ok = (h4 > 0) & jnp.isfinite(h4) & (v4 > 0) & jnp.isfinite(v4)
  ratio = jnp.where(ok, h4 / jnp.where(ok, v4, 1.0), 1.0)
  scale = ratio ** (-1.0 / 8.0) * jnp.exp2(0.5 * (e_v - e_h).astype(jnp.float32))
  return jnp.where(ok & jnp.isfinite(scale) & (scale > 0), scale, 1.0)


def balance(factors: Factors) -> Factors:
  """Rescales factors to equal max-abs (their geometric mean); ``Q`` itself is unchanged."""
  if len(factors) < 2:
    return factors
  norms = jnp.stack([jnp.max(jnp.abs(q)) for q in factors])
  ok = jnp.all(norms > 0) & jnp.all(jnp.isfinite(norms))
  safe = jnp.where(ok, norms, 1.0)
  gmean = jnp.exp(jnp.mean(jnp.log(safe)))
  return tuple(q * (gmean / n) for q, n in zip(factors, safe, strict=True))


def _abs4(x: jax.Array) -> jax.Array:
  """``|x|⁴`` elementwise (``x**4`` for real ``x``)."""
  return jnp.square(_abs2(x)) if jnp.iscomplexobj(x) else x**4


# ---------------------------------------------------------------------------------------------
# Random signs: zero-mean, identity-covariance noise at one random bit per entry.
# ---------------------------------------------------------------------------------------------


def sign_words(shape: tuple[int, ...], dtype: DTypeLike) -> int:
  """How many random 32-bit words :func:`signs_from_words` needs for ``shape`` and ``dtype``."""
  return -(-_sign_count(shape, dtype) // 32)


def signs_from_words(words: jax.Array, shape: tuple[int, ...], dtype: DTypeLike) -> jax.Array:
  """Rademacher noise of ``shape`` from :func:`sign_words` random ``uint32`` ``words``: entries
  ``±1`` (complex: ``(±1 ± i)/√2``), one bit each, so ``E[n nᴴ] = I`` like ``N(0, I)``.

  Where noise only damps ``h``, any zero-mean, identity-covariance noise does;
  ``jax.random.normal`` needs a word (and an ``erf⁻¹``) per entry, which on the byte-level LM of
  ``compare.py`` was a fifth of the whole refit's time on the CPU.
  """
  count = _sign_count(shape, dtype)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & 1
  signs = (2 * bits.reshape(-1)[:count].astype(real_dtype(dtype)) - 1)
  if count == math.prod(shape):
    return signs.reshape(shape)
  pairs = signs.reshape(*shape, 2) * (0.5 ** 0.5)
  return jax.lax.complex(pairs[..., 0], pairs[..., 1]).astype(dtype)


def _sign_count(shape: tuple[int, ...], dtype: DTypeLike) -> int:
  """Random signs for ``shape``: one per entry, two for a complex one."""
  return math.prod(shape) * (2 if jnp.issubdtype(dtype, jnp.complexfloating) else 1)
