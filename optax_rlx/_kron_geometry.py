"""Kron's geometries: how a dense factor is fitted, each in one definition, and the fit of a unit.

A :class:`Geometry` decides everything that differs between Li's Lie groups: the noise that
damps the fitting target, the fitting pair ``(A, B)``, the step of a dense factor, the cleanup of
a group of factors after a step (outside any ``vmap``), and what a refit of the momentum gives
back. :func:`fit_unit` takes one step of every factor of one unit under a geometry, and nothing
outside a definition asks for a geometry's name. Adding a geometry means a new :class:`Geometry`
subclass here, its entry in :data:`GEOMETRIES`, and its name in ``KronOptions``' ``geometry``.
"""

import abc
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_rlx import _kron_numerics as numerics
from optax_rlx._kron_numerics import (
    Dense,
    Pair,
    StepSize,
    ct,
    gram,
    lipschitz_step,
    probe_term,
)

PROCRUSTES_MAX_STEP = 0.25
ASYMMETRY_TOLERANCE = 1e-3

# A factor step: (q, L, pair, axis, step size) -> (new q, new L).
FactorStep = Callable[[jax.Array, jax.Array, Pair, int, StepSize], tuple[jax.Array, jax.Array]]


class UnitFactors(NamedTuple):
  """One fitting unit's preconditioner.

  Attributes:
    factors: one factor per axis, dense ``(n, n)`` or diagonal ``(n,)``.
    lips: one float32 Lipschitz estimate per factor.
    precond: the cached ``P_i = Q_iᴴ Q_i`` (``q_i²`` for diagonal factors), or None.
  """

  factors: tuple[jax.Array, ...]
  lips: tuple[jax.Array, ...]  # per factor, the square root of its Lipschitz estimate
  precond: tuple[jax.Array, ...] | None


class FitInputs(NamedTuple):
  """What one fitting step of a unit sees.

  Attributes:
    h: the fitting target: the momentum or gradient (whitening), ``H v`` (Newton).
    v: the Newton probe, or None (whitening).
    noise: the geometry's :meth:`Geometry.damping_noise` for this unit.
  """

  h: jax.Array
  v: jax.Array | None
  noise: jax.Array


class FitOptions(NamedTuple):
  """How :func:`fit_unit` steps (``scale_by_kron``'s options of the same names)."""

  geometry: "Geometry"
  damping: Any
  lipschitz_decay: Any


def fit_unit(unit: UnitFactors, inputs: FitInputs, dense: Dense, lr: jax.Array,
             options: FitOptions) -> tuple[UnitFactors, jax.Array | None]:
  """One Lie-group step on ``E[hᴴ P h + vᴴ P⁻¹ v]`` of every factor of one unit.

  ``h`` is damped to ``h̃ = h + (damping · RMS(h) + ε|h|) noise`` (``damping`` alone where
  ``h = 0``), so the damping is scale-free: ``P ⪯ I / (damping · RMS(h))``. The pair is
  normalised once (:func:`~optax_rlx._kron_numerics.normalise_pair`); each factor steps on it
  with ``μ / L`` (``L`` its Lipschitz estimate); the factors are rebalanced. ``unit.lips`` holds
  ``√L`` in the pair's own units: ``L`` grows like the pair's square (``|h|`` for the
  triangular and Newton pairs), so ``√L`` stays inside float32's range wherever the pair does.

  A unit whose target ``h`` is all zero (a frozen or unused param, a zero Hessian-vector
  product) carries no information: its factors and estimates stay as they are, whatever the
  damping (undamped, the step would grow them by ``1 + μ`` per refit until they overflow).

  Returns:
    The new factors and estimates (the cache ``precond`` passed through unchanged; the caller
    recomputes it from the factors as stored) and :meth:`Geometry.preconditioned` of the pair:
    ``P h̃`` with ``P`` before this step, or None.
  """
  geometry = options.geometry
  eps = jnp.finfo(inputs.h.dtype).eps
  h_rms = numerics.rms(inputs.h)
  level = options.damping * jnp.where(h_rms > 0, h_rms, 1.0)
  damped = inputs.h + (level + eps * jnp.abs(inputs.h)) * inputs.noise
  a, b = geometry.fitting_pair(unit, damped, inputs, dense)
  preconditioned = geometry.preconditioned(a, inputs.h)
  pair, e = numerics.normalise_pair(a, b)
  size = StepSize(lr, options.lipschitz_decay)
  factors, lips = [], []
  for axis, (q, lip, is_dense) in enumerate(zip(unit.factors, unit.lips, dense, strict=True)):
    step = geometry.dense_step(q.shape[0], inputs.h.size) if is_dense else numerics.diagonal_step
    q, lip = step(q, jnp.square(numerics.ldexp(lip, -e)), pair, axis, size)
    factors.append(q)
    # √L unscaled, capped at the float32 maximum so that an overflow heals at the next fit.
    lips.append(jnp.minimum(numerics.ldexp(jnp.sqrt(lip), e), jnp.finfo(jnp.float32).max))
  informative = jnp.any(inputs.h != 0)
  keep = lambda new, old: jnp.where(informative, new, old)  # noqa: E731
  fitted = UnitFactors(tuple(map(keep, numerics.balance(tuple(factors)), unit.factors)),
                       tuple(map(keep, lips, unit.lips)), unit.precond)
  return fitted, preconditioned


class Geometry(abc.ABC):
  """One of Li's Lie groups for the dense factors: everything that differs between them."""

  name: str
  reads_cached_p: bool  # whether :meth:`fitting_pair` uses ``UnitFactors.precond``
  # Named in the state's group names where dense factors are not Hermitian PD (else "").
  dense_kind: str

  @abc.abstractmethod
  def damping_noise(self, key: jax.Array, shapes: list[tuple[int, ...]],
                    dtypes: list[Any]) -> list[jax.Array]:
    """Zero-mean noise with ``E[n nᴴ] = I`` of each ``shapes[i]`` in ``dtypes[i]``, from
    ``key``."""

  @abc.abstractmethod
  def fitting_pair(self, unit: UnitFactors, damped: jax.Array, inputs: FitInputs,
                   dense: Dense) -> tuple[jax.Array, jax.Array | None]:
    """``(A, B)`` for the damped target; ``B`` None when ``E[v vᴴ] = I`` is integrated out."""

  @abc.abstractmethod
  def preconditioned(self, a: jax.Array, h: jax.Array) -> jax.Array | None:
    """What a refit gives back: ``P h̃`` (``P`` before the step) when the pair holds it, else
    None (then the caller applies ``P`` before the step to the momentum itself)."""

  @abc.abstractmethod
  def dense_step(self, n: int, numel: int) -> FactorStep:
    """The step of a dense ``(n, n)`` factor of a unit of ``numel`` entries."""

  def needs_cleanup(self, n: int, numel: int) -> bool:
    """Whether a dense ``(n, n)`` factor needs :meth:`cleanup` after its step."""
    del n, numel
    return False

  def cleanup(self, stack: jax.Array) -> jax.Array:
    """Repairs a group's stack ``(units, n, n)`` of dense factors after a step; runs once per
    group, outside any ``vmap``."""
    return stack


class Procrustes(Geometry):
  """Li 2024's "Q0.5EQ1.5": ``Q`` symmetric (Hermitian) positive definite, matmuls only.

  ``A = P h̃``, ``B = v`` (whitening: ``term2 = E[v vᴴ] = I`` integrated out), the step
  ``Q ← Q − (μ/L)(term1 − term2) Q`` followed by a small rotation back towards Hermitian. The
  damping noise is random signs (one bit per entry, every leaf's from one draw).
  """

  name = "procrustes"
  reads_cached_p = True
  dense_kind = ""

  def damping_noise(self, key: jax.Array, shapes: list[tuple[int, ...]],
                    dtypes: list[Any]) -> list[jax.Array]:
    # One draw for every shape: on the CPU each draw is a loop of its own.
    counts = [numerics.sign_words(s, d) for s, d in zip(shapes, dtypes, strict=True)]
    words = jax.random.bits(key, (max(sum(counts), 1),), jnp.uint32)
    noise, start = [], 0
    for count, shape, dtype in zip(counts, shapes, dtypes, strict=True):
      noise.append(numerics.signs_from_words(words[start:start + count], shape, dtype))
      start += count
    return noise

  def fitting_pair(self, unit: UnitFactors, damped: jax.Array, inputs: FitInputs,
                   dense: Dense) -> tuple[jax.Array, jax.Array | None]:
    if unit.precond is not None:
      return numerics.apply_precond(unit.precond, damped, dense), inputs.v
    return numerics.precondition(unit.factors, damped, dense), inputs.v

  def preconditioned(self, a: jax.Array, h: jax.Array) -> jax.Array | None:
    return jnp.where(jnp.any(h != 0), a, jnp.zeros_like(a))  # exactly 0 where h is

  def dense_step(self, n: int, numel: int) -> FactorStep:
    return _procrustes_low_rank_step if _low_rank(n, numel) else _procrustes_step

  def needs_cleanup(self, n: int, numel: int) -> bool:
    return _low_rank(n, numel)

  def cleanup(self, stack: jax.Array) -> jax.Array:
    return remove_asymmetry(stack)


class Triangular(Geometry):
  """Li 2019's "EQ": ``Q`` upper triangular, ``A = Q h̃``, ``B = Q⁻ᴴ v`` by triangular solves.

  The damping noise is ``N(0, I)`` per leaf, and for whitening also the probe ``v``.
  """

  name = "triangular"
  reads_cached_p = False
  dense_kind = "triangular"

  def damping_noise(self, key: jax.Array, shapes: list[tuple[int, ...]],
                    dtypes: list[Any]) -> list[jax.Array]:
    keys = jax.random.split(key, len(shapes))
    return [jax.random.normal(k, s, d) for k, s, d in zip(keys, shapes, dtypes, strict=True)]

  def fitting_pair(self, unit: UnitFactors, damped: jax.Array, inputs: FitInputs,
                   dense: Dense) -> tuple[jax.Array, jax.Array | None]:
    a, b = damped, inputs.noise if inputs.v is None else inputs.v
    for axis, (q, is_dense) in enumerate(zip(unit.factors, dense, strict=True)):
      a = numerics.apply_on_axis(q, a, axis, is_dense)
    for axis, (q, is_dense) in enumerate(zip(unit.factors, dense, strict=True)):
      b = solve_transposed(q, b, axis, is_dense)
    return a, b

  def preconditioned(self, a: jax.Array, h: jax.Array) -> jax.Array | None:
    del a, h
    return None

  def dense_step(self, n: int, numel: int) -> FactorStep:
    del n, numel
    return _triangular_step


class Quad(Procrustes):
  """Li's "QUAD" (``psgd_torch``, 2025): ``Q`` Hermitian positive definite, kept so by a
  congruence instead of a rotation.

  The pair, damping noise and refit output are procrustes' (``A = P h̃``). With ``E = term1 −
  term2`` (Hermitian) and ``a = μ / (2L)``, a dense factor steps as ``Q ← (I − aE) Q (I − aE)``,
  then ``Q ← (Q + Qᴴ)/2`` against round-off: a congruence by a matrix that is nonsingular
  (``a‖E‖ ≤ μ/2 < 1``), so ``Q`` stays Hermitian positive definite with two matmuls and no
  rotation. To first order it is the procrustes step symmetrised (``−a(EQ + QE)``); its fixed
  point is the same, ``E = 0``. Diagonal factors step as in every geometry.
  """

  name = "quad"

  def dense_step(self, n: int, numel: int) -> FactorStep:
    return _quad_low_rank_step if _low_rank(n, numel) else _quad_step

  def needs_cleanup(self, n: int, numel: int) -> bool:
    del n, numel
    return False


GEOMETRIES: dict[str, Geometry] = {g.name: g for g in (Procrustes(), Triangular(), Quad())}


# ---------------------------------------------------------------------------------------------
# Procrustes: the factor steps and the rotations that keep Q Hermitian positive definite.
# ---------------------------------------------------------------------------------------------


def _low_rank(n: int, numel: int) -> bool:
  """A dense axis whose unfolding has fewer than ``n / 2`` columns: the low-rank step."""
  return 2 * numel < n * n


def _gram_terms(q: jax.Array, pair: Pair, axis: int) -> tuple[jax.Array, jax.Array]:
  """``(term1 − term2, ℓ)`` of a dense ``(n, n)`` factor along ``axis``: the Gram terms of the
  pair (``term2 = (numel / n) E[|v|²] I`` where ``B`` is integrated out) and ``ℓ``, a lower
  bound of ``‖term1 + term2‖``; every full-rank dense step starts from them."""
  n = q.shape[0]
  term1 = gram(pair.a, axis, True)
  if pair.b is None:  # whitening with E[v vᴴ] = I integrated out
    term2_scalar = probe_term(pair, n, q.dtype)
    term2 = term2_scalar * jnp.eye(n, dtype=q.dtype)
    return term1 - term2, numerics.norm_lower_bound(term1) + term2_scalar
  term2 = gram(pair.b, axis, True)
  return term1 - term2, numerics.norm_lower_bound(term1 + term2)


def _procrustes_step(q: jax.Array, lip: jax.Array, pair: Pair, axis: int,
                     size: StepSize) -> tuple[jax.Array, jax.Array]:
  """``Q ← R(Q − (μ/L)(term1 − term2) Q)``, ``R`` a rotation keeping ``Q`` Hermitian PD."""
  e, bound = _gram_terms(q, pair, axis)
  lip, step = lipschitz_step(lip, bound, size, q.dtype)
  return procrustes_rotation(q - step * (e @ q)), lip


def _low_rank_terms(q: jax.Array, lip: jax.Array, pair: Pair, axis: int, size: StepSize
                    ) -> tuple[jax.Array, jax.Array | None, Any, jax.Array, jax.Array]:
  """What every low-rank dense step (``2 numel < n²``) starts from: the unfoldings ``Y`` of
  ``a`` and ``V`` of ``b`` (None where ``B`` is integrated out), the scalar ``term2`` (0 with
  ``V``), and the new ``(L, step)`` from the bound of ``‖Y Yᴴ + V Vᴴ‖`` (+ ``term2``), with the
  step size reduced by ``sqrt(2k / n)`` (see :func:`_procrustes_low_rank_step`)."""
  n = q.shape[0]
  size = size._replace(lr=size.lr * (2.0 * pair.a.size) ** 0.5 / n)
  y = numerics.unfold(pair.a, axis)
  v = None if pair.b is None else numerics.unfold(pair.b, axis)
  z = y if v is None else jnp.concatenate([y, v], axis=1)
  term2_scalar = probe_term(pair, n, q.dtype) if v is None else 0.0
  bound = numerics.norm_lower_bound_gram(z) + term2_scalar
  lip, step = lipschitz_step(lip, bound, size, q.dtype)
  return y, v, term2_scalar, lip, step


def _procrustes_low_rank_step(q: jax.Array, lip: jax.Array, pair: Pair, axis: int,
                              size: StepSize) -> tuple[jax.Array, jax.Array]:
  """:func:`_procrustes_step` through the unfoldings, for ``2 numel < n²``.

  ``term1 = Y Yᴴ`` (``Y`` the mode-``axis`` unfolding of ``a``, ``(n, k)`` with ``k < n / 2``)
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
  y, v_unf, term2_scalar, lip, step = _low_rank_terms(q, lip, pair, axis, size)
  # q ← q - step (Y Yᴴ q - V Vᴴ q): its new asymmetry qᴴ - q is (up to scale and the small
  # residual left by earlier rotations) Y W_yᴴ - W_y Yᴴ - V W_vᴴ + W_v Vᴴ with W = qᴴ Y, qᴴ V.
  w_y = ct(q) @ y
  diff_q = y @ ct(w_y) - term2_scalar * q
  lefts, rights = [y, w_y], [w_y, -y]
  if v_unf is not None:
    w_v = ct(q) @ v_unf
    diff_q = diff_q - v_unf @ ct(w_v)
    lefts, rights = [*lefts, v_unf, w_v], [*rights, -w_v, v_unf]
  q = q - step * diff_q
  left, right = jnp.concatenate(lefts, axis=1), jnp.concatenate(rights, axis=1)
  if left.shape[1] * 2 > n:
    return procrustes_rotation(q), lip
  # The factored generator leaves earlier residual asymmetry alone: Procrustes.cleanup removes
  # it (once per group of factors, outside any vmap).
  return procrustes_rotation_factored(q, left, right), lip


def procrustes_rotation(q: jax.Array) -> jax.Array:
  """Rotates ``q`` towards Hermitian positive definite (online orthogonal Procrustes step).

  ``q ← U q`` with ``U = exp(a R) ≈ I + aR + (aR)²/2``, ``R = qᴴ - q`` normalised to unit
  Frobenius norm, and ``a ≤ 1/4`` from an exact line search of ``Re tr(U q)`` along the quadratic
  model. ``U`` is unitary to fourth order, so ``P = qᴴ q`` is preserved. ``R`` is divided by a
  power of two before its norm is taken (exact), so an asymmetry whose squares would underflow
  (entries ~1e-20) still normalises to unit norm instead of overflowing.
  """
  r = ct(q) - q
  r = numerics.ldexp(r, -numerics.pow2_exponent(r))
  r = r / (jnp.linalg.norm(r) + jnp.finfo(q.dtype).tiny)
  rq = r @ q
  rrq = r @ rq
  a = _rotation_step(jnp.real(jnp.trace(rq)), jnp.real(jnp.trace(rrq)))
  return q + a * (rq + 0.5 * a * rrq)


def procrustes_rotation_factored(q: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
  """:func:`procrustes_rotation` with the skew generator ``R = left @ rightᴴ`` kept factored.

  ``left`` and ``right`` are ``(n, m)`` with ``m < n``: ``R q = left (rightᴴ q)`` and
  ``R² q = left ((rightᴴ left)(rightᴴ q))`` cost ``O(n² m)`` instead of ``O(n³)``. Each is first
  divided by a power of two (exact; ``R``'s direction is unchanged), so the Gram products
  neither overflow nor underflow for factors of any float32 scale.
  """
  tiny = jnp.finfo(q.dtype).tiny
  left = numerics.ldexp(left, -numerics.pow2_exponent(left))
  right = numerics.ldexp(right, -numerics.pow2_exponent(right))
  # ‖R‖_F² = Re Σ (leftᴴ left) ⊙ conj(rightᴴ right) suffers cancellation when R is small next to
  # its factors: below 1e-3 of ‖left‖ ‖right‖ it is round-off, and no rotation is taken.
  gram_product = jnp.real(jnp.sum((ct(left) @ left) * jnp.conj(ct(right) @ right)))
  fro = jnp.sqrt(jnp.maximum(gram_product, 0.0))
  meaningful = fro > 1e-3 * jnp.linalg.norm(left) * jnp.linalg.norm(right)
  inv = jnp.where(meaningful, 1.0 / (fro + tiny), 0.0)
  c = (ct(right) @ q) * inv  # R q = left c
  mc = ((ct(right) @ left) * inv) @ c  # R² q = left mc
  a = _rotation_step(jnp.real(jnp.sum(left * c.T)), jnp.real(jnp.sum(left * mc.T)))
  return q + left @ (a * c + 0.5 * a * a * mc)


def remove_asymmetry(qs: jax.Array) -> jax.Array:
  """Fully rotates (:func:`procrustes_rotation`) each factor of a stack ``(units, n, n)`` whose
  relative Frobenius asymmetry ``‖qᴴ - q‖ / ‖q‖`` exceeds ``ASYMMETRY_TOLERANCE``.

  One ``lax.cond`` for the whole stack, so it must not run under ``vmap``: there a per-factor
  cond turns into a select and rotates every factor at every refit (``2 n³`` flops each).
  """
  tiny = jnp.finfo(qs.dtype).tiny
  asymmetry = (jnp.linalg.norm(jax.vmap(ct)(qs) - qs, axis=(-2, -1))
               / (jnp.linalg.norm(qs, axis=(-2, -1)) + tiny))
  needs = asymmetry > ASYMMETRY_TOLERANCE

  def rotate(qs):
    return jnp.where(needs[:, None, None], jax.vmap(procrustes_rotation)(qs), qs)

  return jax.lax.cond(jnp.any(needs), rotate, lambda x: x, qs)


def _rotation_step(tr_rq: jax.Array, tr_rrq: jax.Array) -> jax.Array:
  """Step ``a`` maximising ``tr((I + aR + a²R²/2) q)``: ``-tr(Rq)/tr(R²q)``, capped at 1/4."""
  safe = jnp.where(tr_rrq < 0, tr_rrq, -1.0)
  a = jnp.where(tr_rrq < 0, jnp.minimum(-tr_rq / safe, PROCRUSTES_MAX_STEP), PROCRUSTES_MAX_STEP)
  return jnp.where(tr_rq > 0, a, 0.0)


# ---------------------------------------------------------------------------------------------
# Quad: the factor steps.
# ---------------------------------------------------------------------------------------------


def _quad_step(q: jax.Array, lip: jax.Array, pair: Pair, axis: int,
               size: StepSize) -> tuple[jax.Array, jax.Array]:
  """``Q ← sym((I − aE) Q (I − aE))``, ``E = term1 − term2``, ``a = μ / (2L)``."""
  e, bound = _gram_terms(q, pair, axis)
  lip, step = lipschitz_step(lip, bound, size, q.dtype)
  half = 0.5 * step
  p = q - half * (e @ q)
  p = p - half * (p @ e)
  return 0.5 * (p + ct(p)), lip


def _quad_low_rank_step(q: jax.Array, lip: jax.Array, pair: Pair, axis: int,
                        size: StepSize) -> tuple[jax.Array, jax.Array]:
  """:func:`_quad_step` through the unfoldings, for ``2 numel < n²``: ``E = Y Yᴴ − t I`` (or
  ``− V Vᴴ`` for Newton) is never formed, so the step costs ``O(n² k)``. The step size is
  reduced by ``sqrt(2k / n)`` as in :func:`_procrustes_low_rank_step`, for the same reason."""
  y, v, term2_scalar, lip, step = _low_rank_terms(q, lip, pair, axis, size)
  half = 0.5 * step

  def e_left(x):  # E x
    out = y @ (ct(y) @ x) - term2_scalar * x
    return out if v is None else out - v @ (ct(v) @ x)

  def e_right(x):  # x E
    out = (x @ y) @ ct(y) - term2_scalar * x
    return out if v is None else out - (x @ v) @ ct(v)

  p = q - half * e_left(q)
  p = p - half * e_right(p)
  return 0.5 * (p + ct(p)), lip


# ---------------------------------------------------------------------------------------------
# Triangular: the factor step and its triangular algebra.
# ---------------------------------------------------------------------------------------------


def _triangular_step(q: jax.Array, lip: jax.Array, pair: Pair, axis: int,
                     size: StepSize) -> tuple[jax.Array, jax.Array]:
  """``Q ← Q − (μ/L) triu(term1 − term2) Q`` on the group of upper-triangular matrices."""
  assert pair.b is not None  # the triangular pair always has B = Q⁻ᴴ v
  e, bound = _gram_terms(q, pair, axis)
  lip, step = lipschitz_step(lip, bound, size, q.dtype)
  return q - step * upper_matmul(jnp.triu(e), q), lip


def upper_matmul(a: jax.Array, b: jax.Array, min_block: int = 512) -> jax.Array:
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


def solve_transposed(factor: jax.Array, x: jax.Array, axis: int, dense: bool) -> jax.Array:
  """``Q_i⁻ᴴ`` applied along ``axis`` of ``x`` (a triangular solve for a dense factor)."""
  if not dense:
    return x / factor.reshape(numerics.axis_shape(x.ndim, axis, factor.shape[0]))
  conj = jnp.iscomplexobj(factor)
  if axis == x.ndim - 1:  # x conj(Q)⁻¹: solve y conj(Q) = x on the right, no transposes
    flat = x.reshape(-1, x.shape[-1])
    solved = _triangular_solve(False, False, conj)(factor, flat)
    return solved.reshape(x.shape)
  moved = jnp.moveaxis(x, axis, 0)
  flat = moved.reshape(moved.shape[0], -1)
  solved = _triangular_solve(True, True, conj)(factor, flat)
  return jnp.moveaxis(solved.reshape(moved.shape), 0, axis)


@functools.cache
def _triangular_solve(left_side: bool, transpose_a: bool,
                      conjugate_a: bool) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``lax.linalg.triangular_solve`` (upper triangular ``a``) that, batched on a single CPU
  device, loops over its batch instead of calling the batched LAPACK kernel.

  jaxlib 0.10.2's batched CPU ``trsm`` (``lapack_strsm_ffi``) spreads its batch over XLA's
  intra-op pool (``jax::ParallelBatchMap``) and waits on an ``absl::BlockingCounter``; with the
  default (concurrency-optimized) scheduler and several such calls in one program, that wait
  never ends while every pool worker sits idle in ``WaitForWork``: a jitted triangular Kron step
  on a small transformer hung 3 times in 3, five batched solves of (8, n, n) 3 in 3. Unbatched
  calls in a ``lax.map`` never hung (6 in 6). With several devices the batched call stays: a
  loop over a sharded group axis would make XLA gather whole factor groups onto every device.
  Other backends keep the batched solve.
  """

  def solve(a, b):
    return jax.lax.linalg.triangular_solve(a, b, left_side=left_side, lower=False,
                                           transpose_a=transpose_a, conjugate_a=conjugate_a)

  @jax.custom_batching.custom_vmap
  def unbatched_on_cpu(a, b):
    return solve(a, b)

  @unbatched_on_cpu.def_vmap
  def _(axis_size, in_batched, a, b):
    a, b = (x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, batched in zip((a, b), in_batched, strict=True))
    if jax.device_count() > 1:
      return jax.vmap(solve)(a, b), True
    looped = lambda a, b: jax.lax.map(lambda ab: unbatched_on_cpu(*ab), (a, b))  # noqa: E731
    return jax.lax.platform_dependent(a, b, cpu=looped, default=jax.vmap(solve)), True

  return unbatched_on_cpu
