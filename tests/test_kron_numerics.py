"""Kron's numerics (one fitting unit): kernels against their dense definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_rlx import _kron_numerics


@pytest.mark.parametrize("n, min_block", [(5, 512), (300, 64), (515, 128)])
def test_upper_triangular_matmul_skips_only_zero_blocks(rng, n, min_block):
  a = np.triu(rng.standard_normal((n, n))).astype(np.float32)
  b = np.triu(rng.standard_normal((n, n))).astype(np.float32)
  got = np.asarray(_kron_numerics.upper_matmul(jnp.asarray(a), jnp.asarray(b), min_block=min_block))
  np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", [(3, 40), (40, 3), (4, 5, 6), (7,)])
def test_precondition_matches_the_explicit_kronecker_matrix(rng, shape):
  """Both ways of applying a dense factor (via P_i, or Q_i twice) give Qᵀ Q x exactly."""
  dense = tuple(d > 1 and len(shape) > 1 for d in shape)
  factors = tuple(
      jnp.asarray(np.triu(rng.standard_normal((d, d))) + 3 * np.eye(d) if is_dense
                  else rng.uniform(0.5, 2, d), jnp.float32)
      for d, is_dense in zip(shape, dense, strict=True)
  )
  x = rng.standard_normal(shape).astype(np.float32)
  q_full = np.ones((1, 1))
  for f, is_dense in zip(factors, dense, strict=True):
    q_full = np.kron(q_full, np.asarray(f, np.float64) if is_dense else np.diag(np.asarray(f)))
  expected = (q_full.T @ q_full @ x.astype(np.float64).ravel()).reshape(shape)
  got = np.asarray(_kron_numerics.precondition(factors, jnp.asarray(x), dense))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_norm_lower_bounds_are_tight_lower_bounds(rng):
  for k in [3, 20]:
    z = rng.standard_normal((30, k)).astype(np.float32) * np.logspace(0, 1, k).astype(np.float32)
    true = np.linalg.norm(z.astype(np.float64) @ z.T, 2)
    dense = float(_kron_numerics.norm_lower_bound(jnp.asarray(z @ z.T)))
    factored = float(_kron_numerics.norm_lower_bound_gram(jnp.asarray(z)))
    for bound in (dense, factored):
      assert 0.7 * true <= bound <= true * (1 + 1e-5)
  assert float(_kron_numerics.norm_lower_bound_gram(jnp.zeros((5, 2)))) == 0.0
  assert float(_kron_numerics.norm_lower_bound(jnp.zeros((5, 5)))) == 0.0


def test_procrustes_rotation_keeps_p_and_symmetrises(rng):
  s = rng.standard_normal((6, 6))
  q = s @ s.T + 6 * np.eye(6)
  q_skewed = (q + 0.05 * rng.standard_normal((6, 6))).astype(np.float32)
  rotated = np.asarray(_kron_numerics.procrustes_rotation(jnp.asarray(q_skewed)), np.float64)
  p_before = q_skewed.astype(np.float64).T @ q_skewed
  np.testing.assert_allclose(rotated.T @ rotated, p_before, rtol=1e-3, atol=1e-3)
  asym = lambda m: np.linalg.norm(m - m.T)  # noqa: E731
  assert asym(rotated) < 0.5 * asym(q_skewed)


def test_factored_procrustes_rotation_equals_the_full_one(rng):
  """Starting from a symmetric q, the step's asymmetry is exactly left @ rightᵀ (scaled)."""
  n, k = 40, 4
  s = rng.standard_normal((n, n))
  q = jnp.asarray(s @ s.T / n + np.eye(n), jnp.float32)
  y = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
  w = q.T @ y
  stepped = q - 0.01 * (y @ w.T)
  left, right = jnp.concatenate([y, w], 1), jnp.concatenate([w, -y], 1)
  full = np.asarray(_kron_numerics.procrustes_rotation(stepped))
  factored = np.asarray(_kron_numerics.procrustes_rotation_factored(stepped, left, right))
  assert np.abs(full - np.asarray(stepped)).max() > 1e-4  # the rotation did something
  np.testing.assert_allclose(factored, full, rtol=1e-5, atol=1e-6)
  # A generator that cancels to zero (y yᵀ - y yᵀ) leaves q exactly alone, with no NaN.
  unchanged = _kron_numerics.procrustes_rotation_factored(q, jnp.concatenate([y, y], 1),
                                                  jnp.concatenate([y, -y], 1))
  np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(q))


# ---------------------------------------------------------------------------------------------
# Complex fitting units: conjugate transposes wherever the real code transposes.
# ---------------------------------------------------------------------------------------------


def _complex(rng, shape):
  return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.mark.parametrize("shape", [(3, 40), (40, 3), (4, 5, 6)])
def test_complex_precondition_matches_explicit_q_hermitian_q(rng, shape):
  dense = tuple(d > 1 for d in shape)
  factors = tuple(
      jnp.asarray(np.triu(_complex(rng, (d, d))) + 3 * np.eye(d), jnp.complex64) for d in shape
  )
  x = _complex(rng, shape)
  q_full = np.ones((1, 1))
  for f in factors:
    q_full = np.kron(q_full, np.asarray(f, np.complex128))
  expected = (q_full.conj().T @ q_full @ x.astype(np.complex128).ravel()).reshape(shape)
  got = np.asarray(_kron_numerics.precondition(factors, jnp.asarray(x), dense))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_complex_solve_applies_the_inverse_conjugate_transpose(rng, axis):
  shape = (4, 5, 6)
  d = shape[axis]
  q = np.triu(_complex(rng, (d, d))) + 3 * np.eye(d)
  x = _complex(rng, shape)
  got = np.asarray(_kron_numerics.solve_transposed(jnp.asarray(q, jnp.complex64),
                                                   jnp.asarray(x), axis, True))
  back = np.moveaxis(np.tensordot(q.conj().T, got, axes=(1, axis)), 0, axis)  # Qᴴ (Q⁻ᴴ x) = x
  np.testing.assert_allclose(back, x, rtol=1e-4, atol=1e-4)


def test_complex_gram_terms_are_hermitian_with_real_diagonals(rng):
  x = jnp.asarray(_complex(rng, (4, 7)))
  full = np.asarray(_kron_numerics.gram(x, 0, True))
  np.testing.assert_allclose(full, np.asarray(x) @ np.asarray(x).conj().T, rtol=1e-5, atol=1e-5)
  diagonal = _kron_numerics.gram(x, 0, False)
  assert diagonal.dtype == jnp.float32
  np.testing.assert_allclose(diagonal, np.real(np.diag(full)), rtol=1e-5)
  bound = float(_kron_numerics.norm_lower_bound(jnp.asarray(full)))
  assert 0.7 * np.linalg.norm(full, 2) <= bound <= np.linalg.norm(full, 2) * (1 + 1e-5)


def test_complex_procrustes_rotations_keep_p_and_hermitise(rng):
  n, k = 40, 4
  s = _complex(rng, (n, n)).astype(np.complex128)
  q = jnp.asarray(s @ s.conj().T / n + np.eye(n), jnp.complex64)
  y = jnp.asarray(_complex(rng, (n, k)))
  w = q.conj().T @ y
  stepped = q - 0.01 * (y @ w.conj().T)
  left, right = jnp.concatenate([y, w], 1), jnp.concatenate([w, -y], 1)
  full = np.asarray(_kron_numerics.procrustes_rotation(stepped), np.complex128)
  factored = np.asarray(_kron_numerics.procrustes_rotation_factored(stepped, left, right))
  stepped = np.asarray(stepped, np.complex128)
  herm = lambda m: np.linalg.norm(m - m.conj().T) / np.linalg.norm(m)  # noqa: E731
  assert herm(full) < 0.8 * herm(stepped)
  np.testing.assert_allclose(factored, full, rtol=1e-5, atol=1e-5)
  rotated = jnp.asarray(stepped, jnp.complex64)  # repeated rotations: Hermitian, same P
  for _ in range(30):
    rotated = _kron_numerics.procrustes_rotation(rotated)
  rotated = np.asarray(rotated, np.complex128)
  assert herm(rotated) < 1e-3 < herm(stepped)
  assert np.linalg.eigvalsh((rotated + rotated.conj().T) / 2).min() > 0
  p_before = stepped.conj().T @ stepped
  np.testing.assert_allclose(rotated.conj().T @ rotated, p_before, rtol=0,
                             atol=1e-3 * np.abs(p_before).max())


# ---------------------------------------------------------------------------------------------
# Scale-free arithmetic: exact power-of-two rescaling over the whole float32 range.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-37, 1e-30, 1e-3, 1.0, 7.0, 1e30, 3e38])  # normal floats
def test_pow2_exponent_brackets_the_largest_entry(scale):
  x = jnp.asarray([0.5, -1.0, 0.25], jnp.float32) * jnp.float32(scale)
  e = int(_kron_numerics.pow2_exponent(x))
  m = float(jnp.max(jnp.abs(x)))
  assert m < 2.0**e <= 2 * m


def test_pow2_exponent_is_zero_for_zero_and_non_finite_input():
  for x in [jnp.zeros(3), jnp.asarray([1.0, jnp.inf]), jnp.asarray([jnp.nan])]:
    assert int(_kron_numerics.pow2_exponent(x)) == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_rms_neither_overflows_nor_underflows(rng, dtype, scale):
  x = rng.standard_normal(50) + (1j * rng.standard_normal(50) if dtype == jnp.complex64 else 0)
  expected = np.sqrt(np.mean(np.abs(x) ** 2)) * scale
  got = float(_kron_numerics.rms(jnp.asarray(x * scale, dtype)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("k", [-30, -10, 0, 10, 30])
def test_initial_scale_follows_the_gradient_scale_exactly(rng, k):
  """``(mean h⁴)^(-1/8)`` scales as ``10^(-k/2)``: the old formula overflowed h⁴ beyond 1e9."""
  h = rng.standard_normal((6, 4)).astype(np.float32)
  reference = float(np.mean(h.astype(np.float64) ** 4) ** (-1 / 8))
  got = float(_kron_numerics.initial_scale(jnp.asarray(h) * jnp.float32(10.0**k), None))
  np.testing.assert_allclose(got, reference * 10.0 ** (-k / 2), rtol=1e-5)


def test_lipschitz_estimate_heals_after_overflow():
  """An estimate stored at the float32 maximum still gives finite, useful steps later."""
  big = jnp.finfo(jnp.float32).max
  lip, step = _kron_numerics._normalised_step(big, jnp.float32(2.0), 0.1, 0.9, jnp.float32, 64)
  assert np.isfinite(float(lip)) and float(step) > 0
  lip, step = _kron_numerics._normalised_step(jnp.float32(4.0), jnp.float32(2.0), 0.1, 0.9,
                                              jnp.float32, 0)
  np.testing.assert_allclose(float(lip), 3.8, rtol=1e-6)  # 0.9 · 4 + 0.1 · 2 = 3.8 >= 2
  np.testing.assert_allclose(float(step), 0.1 / 3.8, rtol=1e-6)


def _random_signs(key, shape, dtype):
  words = jax.random.bits(key, (_kron_numerics.sign_words(shape, dtype),), jnp.uint32)
  return _kron_numerics.signs_from_words(words, shape, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
def test_random_signs_have_identity_covariance(dtype):
  """The procrustes damping noise: unit-modulus entries, zero mean, E[n nᴴ] = I (entries drawn
  from the same 32-bit word, and from different words, uncorrelated)."""
  n = np.asarray(_random_signs(jax.random.key(7), (20000, 40), dtype))
  assert n.shape == (20000, 40) and n.dtype == dtype
  np.testing.assert_allclose(np.abs(n), 1.0, rtol=1e-6)
  if dtype == jnp.float32:
    assert set(np.unique(n)) == {-1.0, 1.0}
  cov = n.T @ n.conj() / n.shape[0]  # 40 columns: the 32 bits of a word and the next word's
  np.testing.assert_allclose(cov, np.eye(40), atol=0.04)  # ~5 standard errors of 1/sqrt(20000)
  np.testing.assert_allclose(n.mean(axis=0), 0.0, atol=0.04)
  other = np.asarray(_random_signs(jax.random.key(8), (20000, 40), dtype))
  assert np.mean(n == other) < 0.55  # different keys, different signs
