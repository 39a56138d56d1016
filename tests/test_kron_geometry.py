"""Kron's geometries (``_kron_geometry``): one fitting step of a unit against float64 NumPy
transcriptions of Li's updates, each geometry's own kernels, and the rule that nothing outside
a geometry's definition branches on its name."""

import ast
import pathlib
import typing

import jax.numpy as jnp
import numpy as np
import pytest
from kron_reference import fit_reference

from optax_rlx import _kron_geometry, _kron_options
from optax_rlx._kron_geometry import GEOMETRIES, FitInputs, FitOptions, UnitFactors, fit_unit


def _start(rng, geometry, shape, dense, dtype):
  """Factors away from the identity: Hermitian PD (procrustes), upper triangular (triangular)."""
  out = []
  for n, is_dense in zip(shape, dense, strict=True):
    if not is_dense:
      out.append(rng.uniform(0.5, 2.0, n))
      continue
    s = rng.standard_normal((n, n))
    if np.issubdtype(dtype, np.complexfloating):
      s = s + 1j * rng.standard_normal((n, n))
    if geometry != "triangular":  # Hermitian positive definite
      out.append(np.eye(n) + 0.1 * (s + s.conj().T) / np.sqrt(n))
    else:
      out.append(np.eye(n) + 0.2 * np.triu(s) / np.sqrt(n))
  return [jnp.asarray(q, dtype if q.ndim == 2 else np.float32) for q in out]


CASES = [  # geometry, unit shape, dense, Newton probe?, dtype
    ("procrustes", (6, 5), (True, True), False, np.float32),
    ("procrustes", (16, 4), (False, True), False, np.float32),
    ("procrustes", (4, 24), (True, True), False, np.float32),  # 24: the low-rank step
    ("procrustes", (6, 5), (True, True), True, np.float32),
    ("procrustes", (3, 4, 5), (True, True, True), True, np.float32),
    ("procrustes", (6, 5), (True, True), False, np.complex64),
    ("triangular", (6, 5), (True, True), False, np.float32),
    ("triangular", (16, 4), (False, True), False, np.float32),
    ("triangular", (3, 4, 5), (True, True, True), True, np.float32),
    ("triangular", (6, 5), (True, True), True, np.complex64),
    ("quad", (6, 5), (True, True), False, np.float32),
    ("quad", (16, 4), (False, True), False, np.float32),
    ("quad", (4, 24), (True, True), False, np.float32),  # 24: the low-rank step
    ("quad", (4, 24), (True, True), True, np.float32),  # ... with the Newton probe
    ("quad", (3, 4, 5), (True, True, True), True, np.float32),
    ("quad", (6, 5), (True, True), False, np.complex64),
]


@pytest.mark.parametrize("geometry, shape, dense, newton, dtype", CASES)
def test_one_fitting_step_matches_float64_numpy(rng, geometry, shape, dense, newton, dtype):
  def draw(scale=1.0):
    x = rng.standard_normal(shape)
    if np.issubdtype(dtype, np.complexfloating):
      x = (x + 1j * rng.standard_normal(shape)) / np.sqrt(2)
    return jnp.asarray(scale * x, dtype)

  factors = _start(rng, geometry, shape, dense, dtype)
  lips = [jnp.float32(x) for x in rng.uniform(0.0, 30.0, len(shape))]  # √L, as stored
  inputs = FitInputs(h=draw(3.0), v=draw() if newton else None, noise=draw())
  options = FitOptions(GEOMETRIES[geometry], damping=1e-9, lipschitz_decay=0.9)
  fitted, preconditioned = fit_unit(UnitFactors(tuple(factors), tuple(lips), None), inputs,
                                    dense, jnp.float32(0.2), options)
  want_factors, want_lips, want_a = fit_reference(geometry, factors, [float(x)**2 for x in lips],
                                                   inputs, 0.2)
  for got, want, q in zip(fitted.factors, want_factors, factors, strict=True):
    assert got.dtype == q.dtype
    assert np.abs(want - np.asarray(q)).max() > 1e-3  # the step moved the factor
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
  np.testing.assert_allclose([float(x) ** 2 for x in fitted.lips], want_lips, rtol=2e-4)
  if geometry != "triangular":  # a refit on the momentum gives back P h̃, P before the step
    np.testing.assert_allclose(np.asarray(preconditioned), want_a, rtol=2e-4,
                               atol=2e-5 * np.abs(want_a).max())
  else:
    assert preconditioned is None


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_a_fit_from_overflowed_estimates_heals(rng, geometry):
  """Estimates stored at the float32 maximum, gradients near 2^64: the step stays finite, and
  the estimates come back below the maximum."""
  shape = (6, 5)
  factors = _start(rng, geometry, shape, (True, True), np.float32)
  big = jnp.finfo(jnp.float32).max
  h = jnp.asarray(rng.standard_normal(shape) * 2.0**64, jnp.float32)
  inputs = FitInputs(h, None, jnp.asarray(rng.standard_normal(shape), jnp.float32))
  options = FitOptions(GEOMETRIES[geometry], damping=1e-9, lipschitz_decay=0.9)
  fitted, _ = fit_unit(UnitFactors(tuple(factors), (big, big), None), inputs, (True, True),
                       jnp.float32(0.1), options)
  for q in fitted.factors:
    assert bool(jnp.all(jnp.isfinite(q)))
  assert all(np.isfinite(float(x)) and float(x) <= float(big) for x in fitted.lips)


# ---------------------------------------------------------------------------------------------
# One definition per geometry.
# ---------------------------------------------------------------------------------------------


def test_the_geometry_option_allows_exactly_the_defined_geometries():
  assert set(typing.get_args(_kron_options.GeometryName)) == set(GEOMETRIES)
  for name, geometry in GEOMETRIES.items():
    assert geometry.name == name and isinstance(geometry, _kron_geometry.Geometry)


def test_no_code_outside_the_geometry_module_branches_on_a_geometry_name():
  """A comparison with a geometry's name (``geometry == 'triangular'``), or a branch on the
  ``geometry`` option's value, anywhere but in ``_kron_geometry.py`` would be a second place
  that decides what a geometry does."""
  package = pathlib.Path(_kron_geometry.__file__).parent
  names = set(GEOMETRIES)
  offenders = []
  for path in sorted(package.glob("*.py")):
    if path.name == "_kron_geometry.py":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if not isinstance(node, ast.Compare):
        continue
      parts = [node.left, *node.comparators]
      named = any(isinstance(p, ast.Constant) and p.value in names for p in parts)
      by_option = any(isinstance(p, ast.Subscript) and isinstance(p.slice, ast.Constant)
                      and p.slice.value == "geometry" for p in parts)
      by_value = any((isinstance(p, ast.Name) and p.id == "geometry")
                     or (isinstance(p, ast.Attribute) and p.attr == "geometry")
                     or (isinstance(p, ast.Attribute) and p.attr == "name"
                         and isinstance(p.value, ast.Attribute) and p.value.attr == "geometry")
                     for p in parts)
      if named or by_option or by_value:
        offenders.append(f"{path.name}:{node.lineno}")
  assert not offenders


# ---------------------------------------------------------------------------------------------
# Each geometry's own kernels.
# ---------------------------------------------------------------------------------------------


def _complex(rng, shape):
  return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.mark.parametrize("n, min_block", [(5, 512), (300, 64), (515, 128)])
def test_upper_triangular_matmul_skips_only_zero_blocks(rng, n, min_block):
  a = np.triu(rng.standard_normal((n, n))).astype(np.float32)
  b = np.triu(rng.standard_normal((n, n))).astype(np.float32)
  got = np.asarray(_kron_geometry.upper_matmul(jnp.asarray(a), jnp.asarray(b), min_block=min_block))
  np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)


def test_procrustes_rotation_keeps_p_and_symmetrises(rng):
  s = rng.standard_normal((6, 6))
  q = s @ s.T + 6 * np.eye(6)
  q_skewed = (q + 0.05 * rng.standard_normal((6, 6))).astype(np.float32)
  rotated = np.asarray(_kron_geometry.procrustes_rotation(jnp.asarray(q_skewed)), np.float64)
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
  full = np.asarray(_kron_geometry.procrustes_rotation(stepped))
  factored = np.asarray(_kron_geometry.procrustes_rotation_factored(stepped, left, right))
  assert np.abs(full - np.asarray(stepped)).max() > 1e-4  # the rotation did something
  np.testing.assert_allclose(factored, full, rtol=1e-5, atol=1e-6)
  # A generator that cancels to zero (y yᵀ - y yᵀ) leaves q exactly alone, with no NaN.
  unchanged = _kron_geometry.procrustes_rotation_factored(q, jnp.concatenate([y, y], 1),
                                                  jnp.concatenate([y, -y], 1))
  np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(q))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_complex_solve_applies_the_inverse_conjugate_transpose(rng, axis):
  shape = (4, 5, 6)
  d = shape[axis]
  q = np.triu(_complex(rng, (d, d))) + 3 * np.eye(d)
  x = _complex(rng, shape)
  got = np.asarray(_kron_geometry.solve_transposed(jnp.asarray(q, jnp.complex64),
                                                   jnp.asarray(x), axis, True))
  back = np.moveaxis(np.tensordot(q.conj().T, got, axes=(1, axis)), 0, axis)  # Qᴴ (Q⁻ᴴ x) = x
  np.testing.assert_allclose(back, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("asymmetry", [1e-20, 1e-30, 0.0])
def test_rotations_of_a_nearly_symmetric_factor_stay_finite(rng, asymmetry):
  """``7 I + 1e-20 noise``: the asymmetry's squares underflow. Normalising it by its (zero)
  norm made the rotation non-finite before 2026-12-04 (and a factor NaN for good)."""
  n = 12
  q = jnp.asarray(7.0 * np.eye(n) + asymmetry * rng.standard_normal((n, n)), jnp.float32)
  rotated = np.asarray(_kron_geometry.procrustes_rotation(q))
  assert np.all(np.isfinite(rotated))
  np.testing.assert_allclose(rotated, np.asarray(q), atol=1e-6)
  left = jnp.asarray(asymmetry * rng.standard_normal((n, 2)), jnp.float32)
  right = jnp.asarray(asymmetry * rng.standard_normal((n, 2)), jnp.float32)
  factored = np.asarray(_kron_geometry.procrustes_rotation_factored(q, left, right))
  assert np.all(np.isfinite(factored))
  huge = jnp.asarray(1e19 * rng.standard_normal((n, 2)), jnp.float32)  # Gram products 1e76
  big_q = jnp.asarray(1e18 * np.eye(n), jnp.float32)
  assert np.all(np.isfinite(np.asarray(
      _kron_geometry.procrustes_rotation_factored(big_q, huge, big_q @ huge))))


def test_complex_procrustes_rotations_keep_p_and_hermitise():
  # The draw this test was written for (its former file's seed); for most other draws the
  # repeated rotations stall, see the xfail below.
  rng = np.random.default_rng(2741719734)
  n, k = 40, 4
  s = _complex(rng, (n, n)).astype(np.complex128)
  q = jnp.asarray(s @ s.conj().T / n + np.eye(n), jnp.complex64)
  y = jnp.asarray(_complex(rng, (n, k)))
  w = q.conj().T @ y
  stepped = q - 0.01 * (y @ w.conj().T)
  left, right = jnp.concatenate([y, w], 1), jnp.concatenate([w, -y], 1)
  full = np.asarray(_kron_geometry.procrustes_rotation(stepped), np.complex128)
  factored = np.asarray(_kron_geometry.procrustes_rotation_factored(stepped, left, right))
  stepped = np.asarray(stepped, np.complex128)
  herm = lambda m: np.linalg.norm(m - m.conj().T) / np.linalg.norm(m)  # noqa: E731
  assert herm(full) < 0.8 * herm(stepped)
  np.testing.assert_allclose(factored, full, rtol=1e-5, atol=1e-5)
  rotated = jnp.asarray(stepped, jnp.complex64)  # repeated rotations: Hermitian, same P
  for _ in range(30):
    rotated = _kron_geometry.procrustes_rotation(rotated)
  rotated = np.asarray(rotated, np.complex128)
  assert herm(rotated) < 1e-3 < herm(stepped)
  assert np.linalg.eigvalsh((rotated + rotated.conj().T) / 2).min() > 0
  p_before = stepped.conj().T @ stepped
  np.testing.assert_allclose(rotated.conj().T @ rotated, p_before, rtol=0,
                             atol=1e-3 * np.abs(p_before).max())


@pytest.mark.xfail(strict=True, reason="open: repeated complex Procrustes rotations stall at a "
                   "relative anti-Hermitian part of 1e-3 to 5e-2 (real ones reach 1e-8)")
@pytest.mark.parametrize("seed", range(4))
def test_repeated_complex_procrustes_rotations_hermitise_any_draw(seed):
  """Measured 2026-12-04 over 60 rotations: real factors reach 1e-8 for every draw; complex ones
  for seeds 0-5 end at 4e-3, 3e-2, 1e-2, 8e-4, 1e-3, 6e-2."""
  rng = np.random.default_rng(seed)
  n, k = 40, 4
  s = _complex(rng, (n, n)).astype(np.complex128)
  q = jnp.asarray(s @ s.conj().T / n + np.eye(n), jnp.complex64)
  y = jnp.asarray(_complex(rng, (n, k)))
  rotated = q - 0.01 * (y @ (q.conj().T @ y).conj().T)
  for _ in range(60):
    rotated = _kron_geometry.procrustes_rotation(rotated)
  rotated = np.asarray(rotated, np.complex128)
  assert np.linalg.norm(rotated - rotated.conj().T) / np.linalg.norm(rotated) < 1e-4

