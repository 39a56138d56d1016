"""Kron's numerics on one fitting unit: pure functions of arrays, no optax and no pytrees.

A fitting unit is a tensor ``x`` of shape ``(d_1, ..., d_r)`` with one factor ``Q_i`` per axis:
dense ``(d_i, d_i)`` or diagonal ``(d_i,)`` (``dense[i]``), ``Q = Q_1 ⊗ ... ⊗ Q_r`` and
``P = Qᴴ Q``. Everything runs in the dtype of its inputs (float32 or wider; the transform casts).
Complex units have complex dense factors (``ᴴ`` is the conjugate transpose, a plain transpose for
real ones) and real positive diagonal factors; Gram terms are ``A Aᴴ``, norms and traces real.

The fit (:func:`fit_factors`) takes one Lie-group step on ``E[hᵀ P h + vᵀ P⁻¹ v]``; its
per-factor steps are :func:`diagonal_step`, :func:`triangular_step`, :func:`procrustes_step` and
:func:`procrustes_low_rank_step`.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from optax_rlx._common import abs2 as _abs2
from optax_rlx._common import real_dtype

PROCRUSTES_MAX_STEP = 0.25
ASYMMETRY_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class FitOptions:
  """How :func:`fit_factors` steps (see ``scale_by_kron``'s arguments of the same names).

  Attributes:
    geometry: ``'triangular'`` or ``'procrustes'``.
    damping: constant damping of the fitting target (a float, or traced).
    lipschitz_decay: :math:`\\beta_L` of the Lipschitz estimates.
    auto_init: rescale the factors from the first fitting pair.
  """

  geometry: str
  damping: Any
  lipschitz_decay: Any
  auto_init: bool


# ---------------------------------------------------------------------------------------------
# Applying factors.
# ---------------------------------------------------------------------------------------------


def _axis_shape(ndim, axis, size):
  return tuple(size if k == axis else 1 for k in range(ndim))


def _ct(a):
  """``aᴴ``: the conjugate transpose (``aᵀ`` for real ``a``)."""
  return jnp.conj(a).T


def _abs4(x):
  """``|x|⁴`` elementwise (``x**4`` for real ``x``)."""
  return jnp.square(_abs2(x)) if jnp.iscomplexobj(x) else x**4


def cast_factors(factors, dense, dtype):
  """Factors cast to ``dtype`` (to its real part for diagonal factors, which are real)."""
  real = real_dtype(dtype)
  return tuple(q.astype(dtype if d else real) for q, d in zip(factors, dense, strict=True))


def apply_on_axis(factor, x, axis, dense):
  """``factor`` (dense ``(n, n)`` or diagonal ``(n,)``) applied along ``axis`` of ``x``."""
  if not dense:
    return x * factor.reshape(_axis_shape(x.ndim, axis, factor.shape[0]))
  if axis == 0:
    return jnp.tensordot(factor, x, axes=(1, 0))
  if axis == x.ndim - 1:
    return jnp.tensordot(x, factor, axes=(axis, 1))
  return jnp.moveaxis(jnp.tensordot(factor, x, axes=(1, axis)), 0, axis)


def solve_transposed(factor, x, axis, dense):
  """``Q_i⁻ᴴ`` applied along ``axis`` of ``x`` (a triangular solve for a dense factor)."""
  if not dense:
    return x / factor.reshape(_axis_shape(x.ndim, axis, factor.shape[0]))
  solve = jax.lax.linalg.triangular_solve
  conj = jnp.iscomplexobj(factor)
  if axis == x.ndim - 1:  # x conj(Q)⁻¹: solve y conj(Q) = x on the right, no transposes
    flat = x.reshape(-1, x.shape[-1])
    solved = solve(factor, flat, left_side=False, lower=False, conjugate_a=conj)
    return solved.reshape(x.shape)
  moved = jnp.moveaxis(x, axis, 0)
  flat = moved.reshape(moved.shape[0], -1)
  solved = solve(factor, flat, left_side=True, lower=False, transpose_a=True, conjugate_a=conj)
  return jnp.moveaxis(solved.reshape(moved.shape), 0, axis)


def precondition(factors, x, dense):
  """``P x`` with ``P = Qᴴ Q``: each factor applied as ``Q_iᴴ Q_i`` on its axis.

  A dense factor of size ``n`` is applied as ``Q_iᴴ (Q_i x)`` (``4 n · numel`` flops) when
  ``n² > numel``, else through ``P_i = Q_iᴴ Q_i`` (``2 n³ + 2 n · numel`` flops).
  """
  for axis, (q, is_dense) in enumerate(zip(factors, dense, strict=True)):
    if not is_dense:
      x = apply_on_axis(q * q, x, axis, False)
    elif q.shape[0] ** 2 > x.size:
      x = apply_on_axis(_ct(q), apply_on_axis(q, x, axis, True), axis, True)
    else:
      x = apply_on_axis(_ct(q) @ q, x, axis, True)
  return x


def precond_factors(factors, dense):
  """Per axis the factor of ``P = P_1 ⊗ ... ⊗ P_r``: ``P_i = Q_iᴴ Q_i`` (dense) or ``q_i²``."""
  return tuple(_ct(q) @ q if d else q * q for q, d in zip(factors, dense, strict=True))


def apply_precond(precond, x, dense):
  """``P x`` from the factors of :func:`precond_factors` (``2 n · numel`` flops per dense one)."""
  for axis, (p, is_dense) in enumerate(zip(precond, dense, strict=True)):
    x = apply_on_axis(p, x, axis, is_dense)
  return x


_SAME_WIDTH_INT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


def _float_bits(dtype):
  """``(int dtype of the same width, mantissa bits, exponent bias)`` of a real float dtype."""
  info = jnp.finfo(dtype)
  return _SAME_WIDTH_INT[jnp.dtype(dtype).itemsize], int(info.nmant), int(info.maxexp) - 1


def pow2_exponent(x):
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


def _exact_pow2(e, dtype):
  """``2^e`` in ``dtype`` for an int32 ``e`` in its normal range (built from the bits)."""
  int_dtype, nmant, bias = _float_bits(dtype)
  return jax.lax.bitcast_convert_type((e.astype(int_dtype) + bias) << nmant, dtype)


def ldexp(x, e):
  """``x · 2^e``, exact (barring overflow and underflow of the result), for real or complex
  ``x``: three exact multiplications by normal powers of two of the same sign of exponent."""
  real = real_dtype(x.dtype)
  e = jnp.asarray(e, jnp.int32)
  third = jax.lax.div(e, jnp.int32(3))  # truncating: one op (``//`` floors, in four or five)
  for part in (third, third, e - 2 * third):
    x = x * _exact_pow2(part, real)
  return x


def rms(x):
  """``sqrt(mean |x|²)`` without overflow or underflow (computed on ``x / 2^e``)."""
  e = pow2_exponent(x)
  return ldexp(jnp.sqrt(jnp.mean(_abs2(ldexp(x, -e)))), e)


def clip_by_rms(u, threshold):
  """``u / max(1, RMS(u) / threshold)``; ``u`` itself when ``threshold`` is None."""
  if threshold is None:
    return u
  return u / jnp.maximum(1.0, rms(u) / threshold).astype(u.dtype)


# ---------------------------------------------------------------------------------------------
# Gram terms and their norms.
# ---------------------------------------------------------------------------------------------


def gram(x, axis, dense):
  """``x xᴴ`` contracted over every axis but ``axis``: ``(n, n)``, or its (real) diagonal."""
  others = tuple(k for k in range(x.ndim) if k != axis)
  if dense:
    return jax.lax.dot_general(x, jnp.conj(x), ((others, others), ((), ())))
  return jnp.sum(_abs2(x), axis=others)


def unfold(x, axis):
  """The mode-``axis`` unfolding ``(n, numel / n)``: its Gram matrix is ``gram(x, axis, True)``."""
  moved = jnp.moveaxis(x, axis, 0)
  return moved.reshape(moved.shape[0], -1)


def norm_lower_bound(a):
  """A cheap lower bound of ``‖a‖₂`` for Hermitian ``a`` (two power iterations)."""
  scale = jnp.max(jnp.abs(a))
  safe = jnp.where(scale > 0, scale, 1.0)
  a = a / safe
  tiny = jnp.finfo(a.dtype).tiny
  x = jnp.take(a, jnp.argmax(jnp.sum(_abs2(a), axis=1)), axis=0)
  for _ in range(2):
    x = x / (jnp.linalg.norm(x) + tiny)
    x = a @ x
  x = x / (jnp.linalg.norm(x) + tiny)
  return jnp.where(scale > 0, safe * jnp.linalg.norm(a @ x), 0.0)


def norm_lower_bound_gram(z):
  """``norm_lower_bound(z zᴴ)`` without forming ``z zᴴ`` (for tall, thin ``z``)."""
  scale = jnp.max(jnp.abs(z))
  safe = jnp.where(scale > 0, scale, 1.0)
  z = z / safe
  tiny = jnp.finfo(z.dtype).tiny
  x = jnp.take(z, jnp.argmax(jnp.sum(_abs2(z), axis=0)), axis=1)
  for _ in range(2):
    x = x / (jnp.linalg.norm(x) + tiny)
    x = z @ (_ct(z) @ x)
  x = x / (jnp.linalg.norm(x) + tiny)
  return jnp.where(scale > 0, safe * safe * jnp.linalg.norm(z @ (_ct(z) @ x)), 0.0)


def upper_matmul(a, b, min_block=512):
  """``a @ b`` for upper-triangular ``a`` and ``b``, skipping the zero blocks (half the flops).

  Splits in 2 x 2 blocks recursively while blocks stay >= ``min_block``:
  ``[[a11, a12], [0, a22]] @ [[b11, b12], [0, b22]]``
  ``= [[a11 b11, a11 b12 + a12 b22], [0, a22 b22]]``.
  """
  n = a.shape[0]
  if n < 2 * min_block:
    return a @ b
  h = n // 2
  top_left = upper_matmul(a[:h, :h], b[:h, :h], min_block)
  bottom_right = upper_matmul(a[h:, h:], b[h:, h:], min_block)
  top_right = a[:h, :h] @ b[:h, h:] + a[:h, h:] @ b[h:, h:]
  bottom_left = jnp.zeros((n - h, h), a.dtype)
  return jnp.block([[top_left, top_right], [bottom_left, bottom_right]])


# ---------------------------------------------------------------------------------------------
# Procrustes rotations (keep a dense factor symmetric positive definite).
# ---------------------------------------------------------------------------------------------


def _rotation_step(tr_rq, tr_rrq):
  """Step ``a`` maximising ``tr((I + aR + a²R²/2) q)``: ``-tr(Rq)/tr(R²q)``, capped at 1/4."""
  safe = jnp.where(tr_rrq < 0, tr_rrq, -1.0)
  a = jnp.where(tr_rrq < 0, jnp.minimum(-tr_rq / safe, PROCRUSTES_MAX_STEP), PROCRUSTES_MAX_STEP)
  return jnp.where(tr_rq > 0, a, 0.0)


def procrustes_rotation(q):
  """Rotates ``q`` towards Hermitian positive definite (online orthogonal Procrustes step).

  ``q ← U q`` with ``U = exp(a R) ≈ I + aR + (aR)²/2``, ``R = qᴴ - q`` normalised to unit
  Frobenius norm, and ``a ≤ 1/4`` from an exact line search of ``Re tr(U q)`` along the quadratic
  model. ``U`` is unitary to fourth order, so ``P = qᴴ q`` is preserved.
  """
  r = _ct(q) - q
  r = r / (jnp.linalg.norm(r) + jnp.finfo(q.dtype).tiny)
  rq = r @ q
  rrq = r @ rq
  a = _rotation_step(jnp.real(jnp.trace(rq)), jnp.real(jnp.trace(rrq)))
  return q + a * (rq + 0.5 * a * rrq)


def procrustes_rotation_factored(q, left, right):
  """:func:`procrustes_rotation` with the skew generator ``R = left @ rightᴴ`` kept factored.

  ``left`` and ``right`` are ``(n, m)`` with ``m < n``: ``R q = left (rightᴴ q)`` and
  ``R² q = left ((rightᴴ left)(rightᴴ q))`` cost ``O(n² m)`` instead of ``O(n³)``.
  """
  tiny = jnp.finfo(q.dtype).tiny
  # ‖R‖_F² = Re Σ (leftᴴ left) ⊙ conj(rightᴴ right) suffers cancellation when R is small next to
  # its factors: below 1e-3 of ‖left‖ ‖right‖ it is round-off, and no rotation is taken.
  gram_product = jnp.real(jnp.sum((_ct(left) @ left) * jnp.conj(_ct(right) @ right)))
  fro = jnp.sqrt(jnp.maximum(gram_product, 0.0))
  meaningful = fro > 1e-3 * jnp.linalg.norm(left) * jnp.linalg.norm(right)
  inv = jnp.where(meaningful, 1.0 / (fro + tiny), 0.0)
  c = (_ct(right) @ q) * inv  # R q = left c
  mc = ((_ct(right) @ left) * inv) @ c  # R² q = left mc
  a = _rotation_step(jnp.real(jnp.sum(left * c.T)), jnp.real(jnp.sum(left * mc.T)))
  return q + left @ (a * c + 0.5 * a * a * mc)


# ---------------------------------------------------------------------------------------------
# One factor's Lie-group step: q ← q − (μ / L) (term1 − term2) q, per geometry.
# ---------------------------------------------------------------------------------------------


def _normalised_step(lip, bound, lr, lipschitz_decay, dtype, exponent):
  """``L ← max(β_L L + (1 − β_L) ℓ, ℓ)`` and the step size ``μ / L``; returns ``(L, μ / L)``.

  The terms, and so ``bound``, come scaled by ``4^-exponent`` (:func:`fit_factors`); ``L`` is
  stored unscaled, capped at the float32 maximum so that an overflow heals at the next fit.
  """
  bound = bound.astype(jnp.float32)
  lip = ldexp(lip, -2 * exponent)
  lip = jnp.maximum(lipschitz_decay * lip + (1.0 - lipschitz_decay) * bound, bound)
  step = (lr / jnp.maximum(lip, jnp.finfo(jnp.float32).tiny)).astype(dtype)
  return jnp.minimum(ldexp(lip, 2 * exponent), jnp.finfo(jnp.float32).max), step


def _identity_term(numel, n, exponent, dtype):
  """The whitening ``term2 = (numel / n) I``'s scalar, scaled like the pair (``4^-exponent``)."""
  return ldexp(jnp.asarray(numel / n, real_dtype(dtype)), -2 * exponent)


def diagonal_step(q, lip, a, b, axis, lr, lipschitz_decay, exponent=0):
  """``q ← q (1 − (μ/L)(diag term1 − diag term2))`` for a diagonal factor ``q`` of ``(n,)``.

  ``b`` None means whitening with ``E[v vᵀ] = I`` integrated out: ``term2 = (numel / n) I``.
  ``a`` and ``b`` arrive divided by ``2^exponent`` (the terms by ``4^exponent``).
  """
  term1 = gram(a, axis, False)
  if b is None:
    term2 = _identity_term(a.size, q.shape[0], exponent, q.dtype)
    bound = jnp.max(term1) + term2
  else:
    term2 = gram(b, axis, False)
    bound = jnp.max(term1 + term2)
  lip, step = _normalised_step(lip, bound, lr, lipschitz_decay, q.dtype, exponent)
  return q - step * (term1 - term2) * q, lip


def triangular_step(q, lip, a, b, axis, lr, lipschitz_decay, exponent=0):
  """``Q ← Q − (μ/L) triu(term1 − term2) Q`` on the group of upper-triangular matrices."""
  term1 = gram(a, axis, True)
  term2 = gram(b, axis, True)
  bound = norm_lower_bound(term1 + term2)
  lip, step = _normalised_step(lip, bound, lr, lipschitz_decay, q.dtype, exponent)
  return q - step * upper_matmul(jnp.triu(term1 - term2), q), lip


def procrustes_step(q, lip, a, b, axis, lr, lipschitz_decay, exponent=0):
  """``Q ← R(Q − (μ/L)(term1 − term2) Q)``, ``R`` a rotation keeping ``Q`` Hermitian PD."""
  n = q.shape[0]
  term1 = gram(a, axis, True)
  if b is None:  # whitening with E[v vᵀ] = I integrated out: term2 = (numel / n) I
    term2_scalar = _identity_term(a.size, n, exponent, q.dtype)
    term2 = term2_scalar * jnp.eye(n, dtype=q.dtype)
    bound = norm_lower_bound(term1) + term2_scalar
  else:
    term2 = gram(b, axis, True)
    bound = norm_lower_bound(term1 + term2)
  lip, step = _normalised_step(lip, bound, lr, lipschitz_decay, q.dtype, exponent)
  return procrustes_rotation(q - step * ((term1 - term2) @ q)), lip


def procrustes_low_rank_step(q, lip, a, b, axis, lr, lipschitz_decay, exponent=0):
  """:func:`procrustes_step` through the unfoldings, for ``2 numel < n²``.

  ``term1 = Y Yᵀ`` (``Y`` the mode-``axis`` unfolding of ``a``, ``(n, k)`` with ``k < n / 2``)
  is never formed: the step costs ``O(n² k)`` instead of ``O(n³)``, and the rotation acts along
  the step's own low-rank asymmetry.

  Each step sees only ``k`` of the ``n`` directions while the ``term2`` part grows all of them
  multiplicatively, so the fit is noisier by about ``n / k``; the step size is
  ``μ sqrt(2k / n) / L`` (``< μ / L`` exactly on this path). Measured on 64 Rosenbrocks as one
  (2, 64) leaf (a dense 64 x 64 factor, k = 2): at μ / L the factor's condition number passes 2e3
  within 100 steps and training stalls at loss 0.02-0.09 (3 seeds); with the reduction all seeds
  reach < 1e-13, and full-rank factors are unaffected.
  """
  n = q.shape[0]
  lr = lr * (2.0 * a.size) ** 0.5 / n
  y = unfold(a, axis)
  z = y if b is None else jnp.concatenate([y, unfold(b, axis)], axis=1)
  term2_scalar = _identity_term(a.size, n, exponent, q.dtype) if b is None else 0.0
  bound = norm_lower_bound_gram(z) + term2_scalar
  lip, step = _normalised_step(lip, bound, lr, lipschitz_decay, q.dtype, exponent)
  # q ← q - step (Y Yᴴ q - V Vᴴ q): its new asymmetry qᴴ - q is (up to scale and the small
  # residual left by earlier rotations) Y W_yᴴ - W_y Yᴴ - V W_vᴴ + W_v Vᴴ with W = qᴴ Y, qᴴ V.
  w_y = _ct(q) @ y
  diff_q = y @ _ct(w_y) - term2_scalar * q
  left, right = [y, w_y], [w_y, -y]
  if b is not None:
    v_unf = unfold(b, axis)
    w_v = _ct(q) @ v_unf
    diff_q = diff_q - v_unf @ _ct(w_v)
    left, right = [*left, v_unf, w_v], [*right, -w_v, v_unf]
  q = q - step * diff_q
  left, right = jnp.concatenate(left, axis=1), jnp.concatenate(right, axis=1)
  if left.shape[1] * 2 > n:
    return procrustes_rotation(q), lip
  # The factored generator leaves earlier residual asymmetry alone: the caller removes it with
  # :func:`remove_asymmetry` (once per group of factors, outside any vmap).
  return procrustes_rotation_factored(q, left, right), lip


def leaves_asymmetry(geometry, dense, n, numel):
  """Whether this axis's step (:func:`factor_step`) needs :func:`remove_asymmetry` after it."""
  return dense and factor_step(geometry, dense, n, numel) is procrustes_low_rank_step


def remove_asymmetry(qs):
  """Fully rotates (:func:`procrustes_rotation`) each factor of a stack ``(units, n, n)`` whose
  relative Frobenius asymmetry ``‖qᴴ - q‖ / ‖q‖`` exceeds ``ASYMMETRY_TOLERANCE``.

  One ``lax.cond`` for the whole stack, so it must not run under ``vmap``: there a per-factor
  cond turns into a select and rotates every factor at every refit (``2 n³`` flops each).
  """
  tiny = jnp.finfo(qs.dtype).tiny
  asymmetry = (jnp.linalg.norm(jax.vmap(_ct)(qs) - qs, axis=(-2, -1))
               / (jnp.linalg.norm(qs, axis=(-2, -1)) + tiny))
  needs = asymmetry > ASYMMETRY_TOLERANCE

  def rotate(qs):
    return jnp.where(needs[:, None, None], jax.vmap(procrustes_rotation)(qs), qs)

  return jax.lax.cond(jnp.any(needs), rotate, lambda x: x, qs)


def factor_step(geometry, dense, n, numel):
  """The step function for a factor of size ``n`` in a unit of ``numel`` entries."""
  if not dense:
    return diagonal_step
  if geometry == "triangular":
    return triangular_step
  return procrustes_low_rank_step if 2 * numel < n * n else procrustes_step


# ---------------------------------------------------------------------------------------------
# The whole fit of one unit.
# ---------------------------------------------------------------------------------------------


def balance(factors):
  """Rescales factors to equal max-abs (their geometric mean); ``Q`` itself is unchanged."""
  if len(factors) < 2:
    return factors
  norms = jnp.stack([jnp.max(jnp.abs(q)) for q in factors])
  ok = jnp.all(norms > 0) & jnp.all(jnp.isfinite(norms))
  safe = jnp.where(ok, norms, 1.0)
  gmean = jnp.exp(jnp.mean(jnp.log(safe)))
  return tuple(q * (gmean / n) for q, n in zip(factors, safe, strict=True))


def initial_scale(h, v):
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


def fitting_pair(factors, h, v, noise, dense, options, precond=None):
  """``(A, B)`` of the fitting step; ``B`` None when ``E[v vᵀ] = I`` is integrated out.

  ``precond``: the factors' :func:`precond_factors` when cached (procrustes then applies them
  instead of recomputing ``Q_iᴴ Q_i``), else None.

  ``h`` is damped to ``h + (damping · RMS(h) + ε|h|) noise`` (``damping`` alone when
  ``h = 0``), so the damping is scale-free: ``P ⪯ I / (damping · RMS(h))``. Triangular:
  ``A = Q h``, ``B = Q⁻ᴴ v`` (whitening: ``v`` is the damping noise itself, independent of
  ``h``); procrustes: ``A = P h``, ``B = v``.
  """
  eps = jnp.finfo(h.dtype).eps
  h_rms = rms(h)
  level = options.damping * jnp.where(h_rms > 0, h_rms, 1.0)
  damped = h + (level + eps * jnp.abs(h)) * noise
  if options.geometry != "triangular":
    if precond is not None:
      return apply_precond(precond, damped, dense), v
    return precondition(factors, damped, dense), v
  a, b = damped, noise if v is None else v
  for axis, (q, is_dense) in enumerate(zip(factors, dense, strict=True)):
    a = apply_on_axis(q, a, axis, is_dense)
  for axis, (q, is_dense) in enumerate(zip(factors, dense, strict=True)):
    b = solve_transposed(q, b, axis, is_dense)
  return a, b


def _sign_count(shape, dtype):
  """Random signs for ``shape``: one per entry, two for a complex one."""
  return math.prod(shape) * (2 if jnp.issubdtype(dtype, jnp.complexfloating) else 1)


def sign_words(shape, dtype):
  """How many random 32-bit words :func:`signs_from_words` needs for ``shape`` and ``dtype``."""
  return -(-_sign_count(shape, dtype) // 32)


def signs_from_words(words, shape, dtype):
  """Rademacher noise of ``shape`` from :func:`sign_words` random ``uint32`` ``words``: entries
  ``±1`` (complex: ``(±1 ± i)/√2``), one bit each, so ``E[n nᴴ] = I`` like ``N(0, I)``.

  The procrustes fit uses noise only to damp ``h``, where any zero-mean, identity-covariance
  noise does; ``jax.random.normal`` needs a word (and an ``erf⁻¹``) per entry, which on the
  byte-level LM of ``compare.py`` was a fifth of the whole refit's time on the CPU.
  """
  count = _sign_count(shape, dtype)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & 1
  signs = (2 * bits.reshape(-1)[:count].astype(real_dtype(dtype)) - 1)
  if count == math.prod(shape):
    return signs.reshape(shape)
  pairs = signs.reshape(*shape, 2) * (0.5 ** 0.5)
  return jax.lax.complex(pairs[..., 0], pairs[..., 1]).astype(dtype)


def auto_scale(factors, h, v, precond=None):
  """The factors (and their cached :func:`precond_factors`, or None) times the
  :func:`initial_scale` of the pair ``(h, v)``, split evenly over the factors."""
  scale = initial_scale(h, v) ** (1.0 / len(factors))
  factors = tuple(q * scale.astype(q.dtype) for q in factors)
  if precond is not None:  # (s Q_i)ᴴ (s Q_i) = s² Q_iᴴ Q_i, s real
    precond = tuple(p * jnp.square(scale).astype(p.dtype) for p in precond)
  return factors, precond


def fit_factors(factors, lips, h, v, noise, lr, dense, options, precond=None):
  """One Lie-group step of every factor of one fitting unit.

  Args:
    factors: tuple of factors, one per axis of ``h``.
    lips: tuple of float32 scalar Lipschitz estimates, one per factor.
    h: the fitting target: gradient/momentum (whitening) or Hessian-vector product (newton).
    v: the probe of the Hessian-vector product (newton), or None (whitening).
    noise: zero-mean noise like ``h`` with ``E[n nᴴ] = I`` (:func:`signs_from_words` for
      procrustes; ``N(0, I)`` for triangular, where it is also the whitening probe ``v``).
    lr: the preconditioner learning rate μ.
    dense: per axis, whether its factor is dense.
    options: a :class:`FitOptions`.
    precond: the factors' cached :func:`precond_factors`, or None.

  Returns:
    ``(factors, lips, preconditioned)``: the new factors (rebalanced) and Lipschitz estimates,
    and for procrustes ``P h̃`` (``h̃`` the damped ``h``, ``P`` of the factors before this step;
    all zero when ``h`` is), else None. Factors whose axis :func:`leaves_asymmetry` still need
    :func:`remove_asymmetry`. (The automatic initial scale is :func:`auto_scale`, applied by the
    caller before the first fit.)
  """
  a, b = fitting_pair(factors, h, v, noise, dense, options, precond)
  preconditioned = None
  if options.geometry != "triangular":  # P h̃, and exactly 0 where h = 0 (no damping noise)
    preconditioned = jnp.where(jnp.any(h != 0), a, jnp.zeros_like(a))
  # The pair divided by a power of two 2^e >= its largest entry (>= 1 when B = I is integrated
  # out): the Gram terms cannot overflow, and every step sees them scaled by exactly 4^-e.
  exponent = pow2_exponent(a) if b is None else jnp.maximum(pow2_exponent(a), pow2_exponent(b))
  if b is None:
    exponent = jnp.maximum(exponent, 0)
  a = ldexp(a, -exponent)
  b = None if b is None else ldexp(b, -exponent)
  new_factors, new_lips = [], []
  for axis, (q, lip, is_dense) in enumerate(zip(factors, lips, dense, strict=True)):
    step = factor_step(options.geometry, is_dense, q.shape[0], h.size)
    q, lip = step(q, lip, a, b, axis, lr, options.lipschitz_decay, exponent)
    new_factors.append(q)
    new_lips.append(lip)
  return balance(tuple(new_factors)), tuple(new_lips), preconditioned
