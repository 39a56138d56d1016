"""Kron's numerics (one fitting unit): kernels against their dense definitions."""

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
