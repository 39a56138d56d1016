"""Kron's shared numerics (``_kron_numerics``): kernels against their dense definitions, exact
power-of-two scaling, the normalised fitting pair, and the Lipschitz step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_rlx import _kron_numerics


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


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_norm_lower_bound_of_a_complex_rank_one_matrix(scale):
  # a = v vᴴ with Σ v_k² = 0: a maps the conjugate of its own columns (its rows) to zero, so
  # power iterations started from a row (until 2026-12-05) bounded ‖a‖ = ‖v‖² by 0.
  v = np.array([1.0, 1j, 0.5, 0.5j]) * np.sqrt(scale)
  a = np.outer(v, v.conj())
  true = np.linalg.norm(a, 2)
  dense = _kron_numerics.norm_lower_bound(jnp.asarray(a, jnp.complex64))
  factored = _kron_numerics.norm_lower_bound_gram(jnp.asarray(v[:, None], jnp.complex64))
  for bound in (float(dense), float(factored)):
    assert 0.99 * true <= bound <= true * (1 + 1e-5)


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


def test_complex_gram_terms_are_hermitian_with_real_diagonals(rng):
  x = jnp.asarray(_complex(rng, (4, 7)))
  full = np.asarray(_kron_numerics.gram(x, 0, True))
  np.testing.assert_allclose(full, np.asarray(x) @ np.asarray(x).conj().T, rtol=1e-5, atol=1e-5)
  diagonal = _kron_numerics.gram(x, 0, False)
  assert diagonal.dtype == jnp.float32
  np.testing.assert_allclose(diagonal, np.real(np.diag(full)), rtol=1e-5)
  bound = float(_kron_numerics.norm_lower_bound(jnp.asarray(full)))
  assert 0.7 * np.linalg.norm(full, 2) <= bound <= np.linalg.norm(full, 2) * (1 + 1e-5)


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


def test_lipschitz_step_follows_the_estimate_and_never_drops_below_the_bound():
  size = _kron_numerics.StepSize(jnp.float32(0.1), jnp.float32(0.9))
  lip, step = _kron_numerics.lipschitz_step(jnp.float32(4.0), jnp.float32(2.0), size,
                                            jnp.float32)
  np.testing.assert_allclose(float(lip), 3.8, rtol=1e-6)  # 0.9 · 4 + 0.1 · 2 = 3.8 >= 2
  np.testing.assert_allclose(float(step), 0.1 / 3.8, rtol=1e-6)
  lip, _ = _kron_numerics.lipschitz_step(jnp.float32(1.0), jnp.float32(5.0), size, jnp.float32)
  assert float(lip) == 5.0  # a jump up is taken at once


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_normalise_pair_divides_by_one_exact_power_of_two(rng, scale):
  a = jnp.asarray(rng.standard_normal((6, 4)) * scale, jnp.float32)
  b = jnp.asarray(rng.standard_normal((6, 4)) * scale * 3, jnp.float32)
  pair, e = _kron_numerics.normalise_pair(a, b)
  assert float(jnp.max(jnp.abs(pair.b))) <= 1.0 < 2 * float(jnp.max(jnp.abs(pair.b)))
  np.testing.assert_array_equal(np.asarray(_kron_numerics.ldexp(pair.a, e)), np.asarray(a))
  assert pair.probe_variance is None
  # Without B (E[v vᴴ] = I integrated out) the scale never drops below 1: e >= 0.
  pair, e = _kron_numerics.normalise_pair(a, None)
  assert pair.b is None and int(e) == max(0, int(_kron_numerics.pow2_exponent(a)))
  # 4^-e in float32 (0 where it underflows: the probe's term is then below round-off).
  np.testing.assert_allclose(float(pair.probe_variance), np.float32(4.0 ** -int(e)), rtol=1e-6)


def test_diagonal_step_integrates_out_the_identity_probe(rng):
  """With ``B`` None the probe's Gram term is ``probe_variance · numel / n`` on every entry."""
  a = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  pair = _kron_numerics.Pair(a, None, jnp.float32(0.25))
  size = _kron_numerics.StepSize(jnp.float32(0.1), jnp.float32(0.0))
  q = jnp.ones(5, jnp.float32)
  new_q, lip = _kron_numerics.diagonal_step(q, jnp.float32(0.0), pair, 0, size)
  term1 = np.sum(np.asarray(a, np.float64) ** 2, axis=1)
  term2 = 0.25 * 15 / 5
  bound = term1.max() + term2
  np.testing.assert_allclose(float(lip), bound, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new_q), 1 - 0.1 / bound * (term1 - term2), rtol=1e-6)

