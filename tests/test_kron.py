"""Kron-PSGD: the preconditioner reaches its closed-form targets, keeps invariants, and helps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from kron_helpers import GEOMETRIES, one_unit

import optax_rlx
from optax_rlx import _kron_numerics


def _rotation(rng, n):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return q


def _factor(rng, n, cond):
  """A rotated matrix M whose M Mᵀ has condition number ``cond``."""
  s = np.logspace(0, np.log10(cond) / 2, n)
  return (_rotation(rng, n) @ np.diag(s) @ _rotation(rng, n)).astype(np.float32)


def _side_covariances(u):
  """Covariances of the mode-k unfoldings of samples ``u`` of shape (samples, d_1, ..., d_r)."""
  out = []
  for axis in range(1, u.ndim):
    moved = np.moveaxis(np.asarray(u, np.float64), axis, 1)
    flat = moved.reshape(moved.shape[0], moved.shape[1], -1)
    out.append(np.einsum("sik,sjk->ij", flat, flat) / (flat.shape[0] * flat.shape[2]))
  return out


def _cond(c):
  e = np.linalg.eigvalsh(c)
  return e[-1] / e[0]


def _dense_factors(state_qs):
  return tuple(q.astype(jnp.float32) for q in state_qs)


def _precondition(state, x, dense):
  return _kron_numerics.precondition(_dense_factors(one_unit(state.Qs)), x, dense)


def _fit_whitening(tx, sample, shape, steps, key):
  state = tx.init(jnp.zeros(shape))

  def body(state, k):
    return tx.update(sample(k), state)[1], None

  run = jax.jit(lambda s, ks: jax.lax.scan(body, s, ks)[0])
  return run(state, jax.random.split(key, steps))


def _whitening_tx(geometry, precond_lr=None, **kw):
  return optax_rlx.scale_by_kron(
      b1=None,
      precond_update_prob=1.0,
      precond_lr=optax.linear_schedule(0.1, 0.01, 1500) if precond_lr is None else precond_lr,
      update_clip=None,
      geometry=geometry,
      max_skew_dense=float("inf"),
      key=3,
      **kw,
  )


def _measure_whitening(tx, sample, shape, fit_steps, num_samples):
  """Fits on ``sample``; returns the state, P g on fresh samples, and raw / whitened conditions."""
  state = _fit_whitening(tx, sample, shape, fit_steps, jax.random.key(0))
  G = jax.vmap(sample)(jax.random.split(jax.random.key(1), num_samples))
  dense = tuple(q.ndim == 2 for q in one_unit(state.Qs))
  U = jax.vmap(lambda g: _precondition(state, g, dense))(G)
  raw = [_cond(c) for c in _side_covariances(G)]
  white = [_cond(c) for c in _side_covariances(U)]
  return state, U, raw, white


# ---------------------------------------------------------------------------------------------
# Fixed points.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_whitening_reaches_inverse_sqrt_covariance_matrix(rng, geometry):
  """G = A Z Bᵀ with cond(A Aᵀ) = cond(B Bᵀ) = 1e3: P G must have near-identity covariances."""
  m, n = 10, 6
  A, B = jnp.asarray(_factor(rng, m, 1e3)), jnp.asarray(_factor(rng, n, 1e3))

  def sample(k):
    return A @ jax.random.normal(k, (m, n)) @ B.T

  state, U, raw, white = _measure_whitening(_whitening_tx(geometry), sample, (m, n), 4000, 4000)
  assert min(raw) > 500
  assert max(white) <= 2.0, white
  np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(U**2))), 1.0, rtol=0.1)
  # The closed form, up to the scalar split between factors: P_L ∝ (A Aᵀ)^(-1/2).
  q_left = np.asarray(one_unit(state.Qs)[0], np.float64)
  p_left = q_left.T @ q_left
  evals, evecs = np.linalg.eigh(np.asarray(A @ A.T, np.float64))
  target = evecs @ np.diag(evals**-0.5) @ evecs.T
  p_left, target = p_left / np.linalg.norm(p_left), target / np.linalg.norm(target)
  assert np.linalg.norm(p_left - target) < 0.15


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_whitening_reaches_target_for_a_wide_matrix(rng, geometry):
  """(24, 4): the 24-axis Gram has rank 4 per sample, so procrustes takes its low-rank path."""
  m, n = 24, 4
  A, B = jnp.asarray(_factor(rng, m, 1e3)), jnp.asarray(_factor(rng, n, 1e3))

  def sample(k):
    return A @ jax.random.normal(k, (m, n)) @ B.T

  # Triangular converges more slowly here (measured cond 4.5 after 4000 steps at the schedule
  # below for procrustes), so it gets a three times larger precond_lr.
  precond_lr = None if geometry != "triangular" else optax.linear_schedule(0.3, 0.03, 3000)
  tx = _whitening_tx(geometry, precond_lr)
  state, _, raw, white = _measure_whitening(tx, sample, (m, n), 4000, 4000)
  assert min(raw) > 500
  assert max(white) <= 2.0, white
  if geometry != "triangular":  # procrustes and quad keep Q symmetric positive definite
    q = np.asarray(one_unit(state.Qs)[0], np.float64)
    assert np.linalg.norm(q - q.T) <= 1e-2 * np.linalg.norm(q)
    assert np.linalg.eigvalsh((q + q.T) / 2).min() > 0


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_whitening_reaches_target_for_3d_tensor(rng, geometry):
  shape = (6, 5, 4)
  mats = [jnp.asarray(_factor(rng, d, 1e3)) for d in shape]

  def sample(k):
    z = jax.random.normal(k, shape)
    return jnp.einsum("ia,jb,kc,abc->ijk", *mats, z)

  _, _, raw, white = _measure_whitening(_whitening_tx(geometry), sample, shape, 3000, 3000)
  assert min(raw) > 300
  assert max(white) <= 2.0, white


@pytest.mark.parametrize("m, n", [(8, 5), (40, 4)])  # (40, 4): the low-rank procrustes path
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_newton_reaches_inverse_hessian(rng, geometry, m, n):
  """f(W) = ½‖A W B‖²: H = (B Bᵀ) ⊗ (AᵀA), so H⁻¹ g = W and P g must align with it."""
  A, B = jnp.asarray(_factor(rng, m, 1e2)), jnp.asarray(_factor(rng, n, 1e2))

  def loss(w):
    return 0.5 * jnp.sum((A @ w @ B) ** 2)

  # The triangular (EQ) geometry converges more slowly here: measured cosine 0.91 after 4000
  # steps at precond_lr 0.1 → 0.01, against 1.000 for procrustes and quad; it gets a larger
  # precond_lr (quad at a constant 0.3 stalls at cosine 0.95 on (8, 5): noise-limited).
  precond_lr = optax.linear_schedule(0.1, 0.01, 1500) if geometry != "triangular" else 0.3
  tx = optax_rlx.scale_by_kron(
      b1=None, criterion="newton", geometry=geometry, precond_update_prob=1.0,
      precond_lr=precond_lr, update_clip=None, key=4, max_skew_dense=float("inf"),
  )
  w0 = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
  state = tx.init(w0)

  def body(state, _):
    return tx.update(jax.grad(loss)(w0), state, w0, obj_fn=loss)[1], None

  state = jax.jit(lambda s: jax.lax.scan(body, s, None, length=3000)[0])(state)
  for w in [w0, jnp.asarray(rng.standard_normal((m, n)), jnp.float32)]:
    g = jax.grad(loss)(w)
    pg = np.asarray(_precondition(state, g, (True, True))).ravel()
    target = np.asarray(w).ravel()  # H⁻¹ g
    cosine = pg @ target / (np.linalg.norm(pg) * np.linalg.norm(target))
    assert cosine >= 0.99, cosine
    assert 0.8 < np.linalg.norm(pg) / np.linalg.norm(target) < 1.25
    raw_cosine = np.asarray(g).ravel() @ target / (np.linalg.norm(g) * np.linalg.norm(target))
    assert raw_cosine < 0.9  # the problem really is ill-conditioned


def _seed_update(QL, QR, G, lr=0.1):
  """The seed's degenerate rule in float64: the gradient is both probes (B = Q_L⁻ᵀ G Q_R⁻¹)."""
  A = QL @ G @ QR.T
  B = np.linalg.solve(QL.T, G) @ np.linalg.inv(QR)
  dL = np.tril(A @ A.T - B @ B.T)
  dR = np.tril(A.T @ A - B.T @ B)
  normL = max(np.abs(dL).max(), 1e-8)
  normR = max(np.abs(dR).max(), 1e-8)
  return QL - lr * QL @ dL / normL, QR - lr * QR @ dR / normR


def test_seed_probe_equals_gradient_defect_is_gone(rng):
  """With the gradient as both probes, Q = I is a fixed point: P never moves. Ours whitens."""
  m, n = 6, 4
  A, B = _factor(rng, m, 1e3), _factor(rng, n, 1e3)
  QL, QR = np.eye(m), np.eye(n)
  for _ in range(200):
    G = A @ rng.standard_normal((m, n)) @ B.T
    QL, QR = _seed_update(QL, QR, G)
  np.testing.assert_array_equal(QL, np.eye(m))  # the seed's preconditioner never moves
  np.testing.assert_array_equal(QR, np.eye(n))
  tx = _whitening_tx("triangular", precond_init_scale=1.0)
  state = _fit_whitening(
      tx, lambda k: jnp.asarray(A) @ jax.random.normal(k, (m, n)) @ jnp.asarray(B).T,
      (m, n), 200, jax.random.key(0),
  )
  q_left = np.asarray(one_unit(state.Qs)[0], np.float64)
  assert _cond(q_left.T @ q_left) > 10  # ours moved far from the identity


# ---------------------------------------------------------------------------------------------
# Invariants.
# ---------------------------------------------------------------------------------------------


def _train(tx, grads_fn, shape, steps, key=0, params=None):
  params = jnp.zeros(shape) if params is None else params
  state = tx.init(params)

  def body(state, k):
    return tx.update(grads_fn(k), state, params)[1], None

  return jax.jit(lambda s, ks: jax.lax.scan(body, s, ks)[0])(
      state, jax.random.split(jax.random.key(key), steps)
  )


def test_triangular_factors_stay_upper_triangular(rng):
  A = jnp.asarray(_factor(rng, 7, 1e2))
  tx = optax_rlx.scale_by_kron(geometry="triangular", precond_update_prob=1.0, key=0)
  state = _train(tx, lambda k: A @ jax.random.normal(k, (7, 7)), (7, 7), 300)
  for q in one_unit(state.Qs):
    assert np.any(np.triu(np.asarray(q), 1) != 0)  # it did move off the diagonal
    np.testing.assert_array_equal(np.tril(np.asarray(q), -1), 0.0)


def test_procrustes_factors_stay_symmetric_positive_definite(rng):
  A = jnp.asarray(_factor(rng, 7, 1e2))
  tx = optax_rlx.scale_by_kron(geometry="procrustes", precond_update_prob=1.0, key=0)
  state = _train(tx, lambda k: A @ jax.random.normal(k, (7, 7)), (7, 7), 300)
  for q in one_unit(state.Qs):
    q = np.asarray(q, np.float64)
    assert np.linalg.norm(q - q.T) <= 1e-2 * np.linalg.norm(q)
    assert np.linalg.eigvalsh((q + q.T) / 2).min() > 0
    assert np.abs(q - np.diag(np.diag(q))).max() > 1e-3  # it did move


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("criterion", ["whitening", "newton"])
def test_zero_gradients_give_finite_zero_updates(geometry, criterion):
  tx = optax_rlx.scale_by_kron(geometry=geometry, criterion=criterion, key=0)
  params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4), "s": jnp.zeros(())}
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  extra = {"obj_fn": lambda p: 0.0 * jnp.sum(p["w"])} if criterion == "newton" else {}
  step = jax.jit(lambda s: tx.update(zeros, s, params, **extra))
  for _ in range(5):
    updates, state = step(state)
    for leaf in jax.tree.leaves((updates, state.Qs, state.Ls)):
      assert bool(jnp.all(jnp.isfinite(leaf)))
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("damping", [0.0, 1e-9])
def test_frozen_leaves_keep_their_factors_for_any_damping(geometry, damping):
  """Params the loss does not use (frozen or unused) have exactly zero gradients: their units
  carry no information, and their factors stay as initialised. Before 2026-12-04, with
  ``damping=0.0`` (accepted) they grew by 1 + μ per refit until they overflowed, and the first
  step without a refit (after step 500) turned the param itself into NaN; with the default
  damping they grew towards ``1 / damping``."""
  params = {"w": jnp.ones((6, 4)), "frozen": jnp.ones((5, 3)), "fb": jnp.ones(3)}
  tx = optax_rlx.kron(1e-2, damping=damping, geometry=geometry)

  def loss(p):
    return jnp.sum((p["w"] - 2.0) ** 2)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  p, state = params, tx.init(params)
  for _ in range(520):  # past the 500 refits of the flat start
    p, state = step(p, state)
  factors = optax_rlx.kron_by_leaf(state[0].Qs, params, geometry=geometry)
  for q in (*factors["frozen"], *factors["fb"]):
    np.testing.assert_array_equal(np.asarray(q), np.eye(q.shape[0]) if q.ndim == 2 else 1.0)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
  np.testing.assert_array_equal(np.asarray(p["frozen"]), 1.0)
  assert float(loss(p)) < 1e-3 * float(loss(params))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_bf16_preconditioner_stays_finite_over_1000_steps(rng, geometry):
  A = jnp.asarray(_factor(rng, 16, 1e3))
  tx = optax_rlx.scale_by_kron(
      geometry=geometry, precond_dtype=jnp.bfloat16, precond_update_prob=1.0, key=0
  )
  state = _train(tx, lambda k: (A @ jax.random.normal(k, (16, 12))).astype(jnp.bfloat16),
                 (16, 12), 1000, params=jnp.zeros((16, 12), jnp.bfloat16))
  for q in one_unit(state.Qs):
    assert q.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(q)))
  g = (A @ jax.random.normal(jax.random.key(9), (16, 12))).astype(jnp.bfloat16)
  u, _ = tx.update(g, state, jnp.zeros((16, 12), jnp.bfloat16))
  assert u.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(u)))
  assert 0.3 < float(jnp.sqrt(jnp.mean(u.astype(jnp.float32) ** 2))) <= 1.1 * 1.01


def test_non_finite_gradients_are_visible_and_apply_if_finite_guards_the_state():
  params = jnp.ones((4, 3))
  bad = params.at[0, 0].set(jnp.inf)
  tx = optax_rlx.kron(1e-2, key=0)
  u, _ = tx.update(bad, tx.init(params), params)
  assert not bool(jnp.all(jnp.isfinite(u)))
  guarded = optax.apply_if_finite(optax_rlx.kron(1e-2, key=0), max_consecutive_errors=5)
  state = guarded.init(params)
  u, state = guarded.update(bad, state, params)
  assert float(jnp.max(jnp.abs(u))) == 0.0 and int(state.notfinite_count) == 1
  inner = state.inner_state[0]
  for leaf in jax.tree.leaves((inner.mu, inner.Qs, inner.Ls)):
    assert bool(jnp.all(jnp.isfinite(leaf)))


def test_update_rms_is_clipped(rng):
  tx = optax_rlx.scale_by_kron(update_clip=0.5, key=0)
  g = jnp.asarray(rng.standard_normal((6, 6)) * 100.0, jnp.float32)
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(u**2))), 0.5, rtol=1e-4)


def test_vector_gets_a_diagonal_whitening_preconditioner():
  scales = jnp.logspace(-2, 2, 9)
  tx = optax_rlx.scale_by_kron(b1=None, precond_update_prob=1.0, update_clip=None, key=0)
  state = _train(tx, lambda k: scales * jax.random.normal(k, (9,)), (9,), 2000)
  assert one_unit(state.Qs)[0].shape == (9,)
  u = jax.vmap(lambda k: _precondition(state, scales * jax.random.normal(k, (9,)), (False,)))(
      jax.random.split(jax.random.key(5), 2000)
  )
  per_coordinate = np.sqrt(np.mean(np.asarray(u) ** 2, axis=0))
  assert per_coordinate.max() / per_coordinate.min() < 1.5  # raw: 1e4


# ---------------------------------------------------------------------------------------------
# Structure: shapes, stacked layers, schedule, keys, Newton plumbing.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kwargs, expected",
    [
        ((), {}, [(1,)]),
        ((7,), {}, [(7,)]),
        ((6, 6), {}, [(6, 6), (6, 6)]),
        ((64, 8), {}, [(64,), (8, 8)]),  # 64² > 512: the skew rule makes it diagonal
        ((64, 8), {"max_skew_dense": float("inf")}, [(64, 64), (8, 8)]),
        ((6, 1, 6), {}, [(6, 6), (1,), (6, 6)]),
        ((6, 6), {"max_size_dense": 5}, [(6,), (6,)]),
        ((6, 6), {"min_ndim_dense": 3}, [(6,), (6,)]),
        ((6, 7), {"memory_save_mode": "one_diag", "max_skew_dense": 2.0}, [(6, 6), (7,)]),
        ((6, 6), {"memory_save_mode": "all_diag"}, [(6,), (6,)]),
        ((4, 5, 6), {}, [(4, 4), (5, 5), (6, 6)]),
        # block_size: 12 -> 3 blocks of 4, 10 -> 5 blocks of 2 (the fewest equal blocks <= 4).
        ((12, 10), {"block_size": 4, "max_skew_dense": float("inf")}, [(15, 4, 4), (15, 2, 2)]),
        ((12, 10), {"block_size": 4, "max_skew_dense": 1.0}, [(15, 4), (15, 2, 2)]),  # on a block
        ((12, 10), {"block_size": 4}, [(15, 4, 4), (15, 2, 2)]),  # (4, 2) is 2:1: dense
        ((12, 4), {"block_size": 12}, [(12,), (4, 4)]),  # no axis above the block size
        ((13, 4), {"block_size": 4}, [(13, 1), (13, 4)]),  # prime: 13 blocks of (1, 4)
        ((12,), {"block_size": 5}, [(3, 4)]),  # vectors too: 3 diagonal blocks of 4
    ],
)
def test_factor_shapes(shape, kwargs, expected):
  params = jnp.zeros(shape)
  state = optax_rlx.scale_by_kron(key=0, **kwargs).init(params)
  factors = optax_rlx.kron_by_leaf(state.Qs, params, **kwargs)
  assert [q.shape for q in factors] == expected
  for q in factors:
    assert q.dtype == jnp.float32


def test_stacked_layers_get_their_own_preconditioners():
  """Three layers with gradient scales 1e-2, 1, 1e2: each layer's output is whitened alone."""
  scales = jnp.array([1e-2, 1.0, 1e2]).reshape(3, 1, 1)
  mix = jnp.diag(jnp.logspace(0, 1, 6))
  tx = optax_rlx.scale_by_kron(
      b1=None, precond_update_prob=1.0, update_clip=None, stacked_layers={"w": True, "b": False},
      max_skew_dense=float("inf"), key=0,
  )
  params = {"w": jnp.zeros((3, 6, 5)), "b": jnp.zeros(5)}
  state = tx.init(params)
  stacked = {"stacked_layers": {"w": True, "b": False}, "max_skew_dense": float("inf")}
  assert [q.shape for q in optax_rlx.kron_by_leaf(state.Qs, params, **stacked)["w"]] == [
      (3, 6, 6), (3, 5, 5)]
  assert [x.shape for x in optax_rlx.kron_by_leaf(state.Ls, params, **stacked)["w"]] == [
      (3,), (3,)]

  def grads(k):
    z = jax.random.normal(k, (3, 6, 5))
    return {"w": scales * jnp.einsum("ij,ljk->lik", mix, z), "b": jax.random.normal(k, (5,))}

  def body(state, k):
    return tx.update(grads(k), state)[1], None

  state = jax.jit(lambda s, ks: jax.lax.scan(body, s, ks)[0])(
      state, jax.random.split(jax.random.key(0), 1500)
  )
  out = jax.vmap(lambda k: tx.update(grads(k), state)[0]["w"])(
      jax.random.split(jax.random.key(1), 200)
  )
  rms_per_layer = np.sqrt(np.mean(np.asarray(out) ** 2, axis=(0, 2, 3)))
  np.testing.assert_allclose(rms_per_layer, 1.0, rtol=0.15)


def _blocks(x, rows, cols):
  """The (rows, cols) blocks of the last two axes of ``x``, as a dict of separate leaves."""
  return {
      f"{i}{j}": x[..., i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
      for i in range(x.shape[-2] // rows)
      for j in range(x.shape[-1] // cols)
  }


@pytest.mark.parametrize("shape, stacked", [((8, 6), False), ((2, 8, 6), True)])
def test_block_partitioning_equals_separate_preconditioners_per_block(rng, shape, stacked):
  """With block_size=4, an (8, 6) leaf is 2 x 2 blocks of (4, 3): each block is preconditioned
  exactly as if it were its own leaf (the whitening fit is probe-free with damping 0)."""
  kw = dict(b1=0.9, precond_update_prob=1.0, damping=0.0, update_clip=None,
            max_skew_dense=float("inf"), stacked_layers=stacked, key=0)
  blocked = optax_rlx.scale_by_kron(block_size=4, **kw)
  separate = optax_rlx.scale_by_kron(**kw)
  s_blocked = blocked.init(jnp.zeros(shape))
  s_separate = separate.init(_blocks(jnp.zeros(shape), 4, 3))
  lead = 4 * (shape[0] if stacked else 1)
  blocked_factors = lambda state: optax_rlx.kron_by_leaf(  # noqa: E731
      state.Qs, jnp.zeros(shape), block_size=4, **kw)
  assert [q.shape for q in blocked_factors(s_blocked)] == [(lead, 4, 4), (lead, 3, 3)]
  mix = rng.standard_normal((shape[-2], shape[-2]))  # correlated rows: the factors must move
  step = jax.jit(lambda g, s: blocked.update(g, s))
  for _ in range(20):
    g = jnp.asarray(mix @ rng.standard_normal(shape), jnp.float32)
    u_blocked, s_blocked = step(g, s_blocked)
    u_separate, s_separate = separate.update(_blocks(g, 4, 3), s_separate)
    for name, u in _blocks(u_blocked, 4, 3).items():
      np.testing.assert_allclose(np.asarray(u), np.asarray(u_separate[name]), rtol=2e-4,
                                 atol=1e-6, err_msg=name)
  assert not np.allclose(np.asarray(blocked_factors(s_blocked)[0][0]), np.eye(4), atol=1e-2)


def test_block_size_bounds_preconditioner_memory():
  """A (12288, 768) leaf: whole, one 12288-long axis is diagonal (skew rule) or a 600 MB dense
  factor (max_skew_dense=inf); in blocks of 4096, three (4096, 4096) factors at most."""
  params = jax.ShapeDtypeStruct((12288, 768), jnp.float32)
  options = {"whole": dict(max_skew_dense=float("inf"), max_size_dense=12288, b1=None),
             "blocked": dict(max_skew_dense=float("inf"), block_size=4096, b1=None)}
  whole, blocked = (
      optax_rlx.kron_by_leaf(jax.eval_shape(optax_rlx.kron(1e-3, **kw).init, params)[0].Qs,
                             params, **kw)
      for kw in options.values())
  assert [q.shape for q in whole] == [(12288, 12288), (768, 768)]
  assert [q.shape for q in blocked] == [(3, 4096, 4096), (3, 768, 768)]
  nbytes = lambda factors: sum(q.size * 4 for q in factors)  # noqa: E731
  assert nbytes(blocked) < 0.35 * nbytes(whole)  # 3 x 4096² + 3 x 768² vs 12288² + 768²


def test_refit_schedule_is_deterministic_from_the_step_count():
  tx = optax_rlx.scale_by_kron(precond_update_prob=0.25, key=0)
  params = jnp.zeros((4, 4))
  state = tx.init(params)
  refits = 0
  step = jax.jit(lambda g, s: tx.update(g, s))
  for i in range(100):
    before = one_unit(state.Ls)[0]
    _, state = step(jnp.full((4, 4), 1.0 + i), state)
    refits += int(not np.array_equal(before, one_unit(state.Ls)[0]))
  assert refits == 26  # step 0 always refits, then every 4th step: 3, 7, ..., 99
  default = optax_rlx.precond_update_prob_schedule()
  assert float(default(0)) == 1.0 and float(default(199)) == 1.0 and float(default(300)) < 0.91
  assert abs(float(default(20_000)) - 0.03) < 1e-7


def test_newton_needs_obj_fn_and_computes_hvp_only_on_refit_steps():
  calls = []

  def loss(w):
    jax.debug.callback(lambda: calls.append(1))
    return 0.5 * jnp.sum(w**2)

  w = jnp.ones((3, 3))
  for prob, expected_refits in [(1.0, 8), (0.25, 3)]:  # refits at steps 0, 3, 7
    calls.clear()
    tx = optax_rlx.scale_by_kron(criterion="newton", precond_update_prob=prob, key=0)
    state = tx.init(w)
    step = jax.jit(lambda s, tx=tx: tx.update(w, s, w, obj_fn=loss))
    for _ in range(8):
      _, state = step(state)
    per_refit = len(calls) / expected_refits
    assert len(calls) > 0 and per_refit == int(per_refit)
    if prob == 1.0:
      calls_per_refit = per_refit
  assert calls_per_refit == per_refit  # the skipped steps computed no HVP
  tx = optax_rlx.scale_by_kron(criterion="newton", key=0)
  with pytest.raises(ValueError, match="obj_fn"):
    tx.update(w, tx.init(w), w)
  with pytest.raises(ValueError, match="params"):
    tx.update(w, tx.init(w), obj_fn=loss)


def test_kron_alias_passes_obj_fn_through_the_chain_under_jit():
  """Newton at the defaults through ``kron``'s chain under jit: the (3, 2) leaf is dense on both
  sides and its Hessian I ⊗ AᵀA has condition 1e4. Measured relative loss after 600 steps:
  8e-16 (key 0), 8e-19, 2e-18 (keys 1, 2); 300 steps gave 1.7e-5."""
  A = jnp.diag(jnp.array([1.0, 10.0, 100.0]))

  def loss(w):
    return 0.5 * jnp.sum((A @ w) ** 2)

  tx = optax_rlx.kron(optax.cosine_decay_schedule(0.3, 600), criterion="newton", key=0)

  @jax.jit
  def step(w, state):
    updates, state = tx.update(jax.grad(loss)(w), state, w, obj_fn=loss)
    return optax.apply_updates(w, updates), state

  w = jnp.ones((3, 2))
  state = tx.init(w)
  assert [q.shape for q in one_unit(state[0].Qs)] == [(3, 3), (2, 2)]
  for _ in range(600):
    w, state = step(w, state)
  assert float(loss(w)) < 1e-6 * float(loss(jnp.ones((3, 2))))


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_newton_under_masks_fits_the_masked_in_leaves(wrapper):
  """optax.masked / multi_transform hand Kron params with optax.MaskedNode where a leaf is not
  Kron's; the user's loss failed on them inside the Hessian-vector product (TypeError
  'MaskedNode' and 'int', before 2026-12-04). Now Kron names the fix, and with
  ``fill_masked`` the updates equal Kron's on the masked-in leaf alone, for 5 steps."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), "b": jnp.ones(3)}

  def loss(p):
    return (jnp.sum((p["w"] @ jnp.arange(1.0, 4.0) - 1.0) ** 2) + 0.1 * jnp.sum(p["w"] ** 4)
            + jnp.sum(p["b"] ** 2))

  kron = optax_rlx.kron(1e-2, criterion="newton", key=0)
  if wrapper == "masked":
    tx = optax.masked(kron, {"w": True, "b": False})
  else:
    tx = optax.multi_transform({"kron": kron, "adam": optax.adam(1e-2)}, {"w": "kron", "b": "adam"})
  with pytest.raises(ValueError, match=r"optax.MaskedNode.*fill_masked"):
    tx.update(jax.grad(loss)(params), tx.init(params), params, obj_fn=loss)
  alone = optax_rlx.kron(1e-2, criterion="newton", key=0)
  state, alone_state = tx.init(params), alone.init(params["w"])
  p, w = params, params["w"]
  for _ in range(5):
    updates, state = tx.update(jax.grad(loss)(p), state, p, obj_fn=optax_rlx.fill_masked(loss, p))
    w_loss = lambda w, b=p["b"]: loss({"w": w, "b": b})  # noqa: E731
    expected, alone_state = alone.update(jax.grad(w_loss)(w), alone_state, w, obj_fn=w_loss)
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(expected), rtol=1e-6,
                               atol=1e-7)
    p, w = optax.apply_updates(p, updates), optax.apply_updates(w, expected)


def test_key_is_stored_split_and_reproducible():
  g = jnp.asarray(np.arange(12.0).reshape(3, 4) - 5.0)
  outs = {}
  for name, key in [("int", 7), ("typed", jax.random.key(7)),
                    ("raw", jax.random.PRNGKey(7)), ("other", 8)]:
    tx = optax_rlx.scale_by_kron(key=key)
    state = tx.init(g)
    keys = [np.asarray(state.key)]
    for _ in range(3):
      u, state = tx.update(g, state)
      keys.append(np.asarray(state.key))
    assert len({k.tobytes() for k in keys}) == 4  # split every step
    outs[name] = np.asarray(u)
  np.testing.assert_array_equal(outs["int"], outs["typed"])
  np.testing.assert_array_equal(outs["int"], outs["raw"])
  assert not np.array_equal(outs["int"], outs["other"])


def test_momentum_is_bias_corrected_before_preconditioning():
  """With identity Q and no refits after step 1, the update is the debiased momentum."""
  tx = optax_rlx.scale_by_kron(
      b1=0.9, precond_init_scale=1.0, precond_update_prob=1e-9, update_clip=None, key=0,
      precond_lr=1e-30,
  )
  gs = [jnp.full((3,), v) for v in (1.0, 2.0, -1.0)]
  state = tx.init(gs[0])
  m = 0.0
  for t, g in enumerate(gs, start=1):
    u, state = tx.update(g, state)
    m = 0.9 * m + 0.1 * float(g[0])
    np.testing.assert_allclose(np.asarray(u), m / (1 - 0.9**t), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# It helps: ill-conditioned problems against Adam.
# ---------------------------------------------------------------------------------------------


def _minimise(tx, loss, params, steps):
  state = tx.init(params)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), loss(p)

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((params, state))
  return float(loss(params))


def test_beats_adam_on_ill_conditioned_least_squares(rng):
  """min ½‖X W - Y‖² with correlated (rotated) features, cond(XᵀX) = 1e4; best lr of a grid."""
  X = jnp.asarray(rng.standard_normal((256, 16)) @ _factor(rng, 16, 1e4), jnp.float32)
  W_true = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
  Y = X @ W_true

  def loss(w):
    return 0.5 * jnp.mean(jnp.sum((X @ w - Y) ** 2, axis=1))

  w0 = jnp.zeros((16, 8))
  steps = 500
  lrs = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
  best = {}
  for name, make in [
      ("kron", lambda lr: optax_rlx.kron(optax.cosine_decay_schedule(lr, steps), key=0)),
      ("adam", lambda lr: optax.adam(optax.cosine_decay_schedule(lr, steps))),
  ]:
    best[name] = min(_minimise(make(lr), loss, w0, steps) for lr in lrs)
  assert best["kron"] * 10 <= best["adam"], best


def test_beats_adam_on_rosenbrock():
  """Best of an lr grid at 2000 steps; measured: kron 8.5e-11, adam 4.5e-6."""

  def loss(p):
    return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

  steps, start = 2000, jnp.array([-1.2, 1.0])
  lrs = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
  kron_best = min(
      _minimise(optax_rlx.kron(optax.cosine_decay_schedule(lr, steps), key=0), loss, start, steps)
      for lr in lrs
  )
  adam_best = min(
      _minimise(optax.adam(optax.cosine_decay_schedule(lr, steps)), loss, start, steps)
      for lr in lrs
  )
  assert kron_best < 1e-8
  assert kron_best * 100 <= adam_best, (kron_best, adam_best)


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"criterion": "fisher"}, "criterion"),
        ({"geometry": "lower"}, "geometry"),
        ({"memory_save_mode": "some_diag"}, "memory_save_mode"),
        ({"precond_fit_on": "params"}, "precond_fit_on"),
        ({"b1": 1.0}, "b1"),
        ({"precond_lr": -0.1}, "precond_lr"),
        ({"precond_lr": float("nan")}, "precond_lr"),
        ({"precond_update_prob": 0.0}, "precond_update_prob"),
        ({"precond_update_prob": 1.5}, "precond_update_prob"),
        ({"precond_init_scale": 0.0}, "precond_init_scale"),
        ({"damping": -1.0}, "damping"),
        ({"lipschitz_decay": 1.0}, "lipschitz_decay"),
        ({"update_clip": 0.0}, "update_clip"),
        ({"max_size_dense": 0}, "max_size_dense"),
        ({"min_ndim_dense": -1}, "min_ndim_dense"),
        ({"max_skew_dense": -1.0}, "max_skew_dense"),
        ({"dense_budget": -0.5}, "dense_budget"),
        ({"dense_budget": float("nan")}, "dense_budget"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 2.5}, "block_size"),
        ({"group_multiple": 0}, "group_multiple"),
        ({"group_multiple": 2.0}, "group_multiple"),
        ({"mu_dtype": jnp.int8}, "mu_dtype"),
        ({"precond_dtype": "int32"}, "precond_dtype"),
        ({"key": "seed"}, "key"),
        ({"nesterov": 1}, "nesterov"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_option(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_rlx.kron(1e-3, **kwargs)


def test_missing_inputs_raise_naming_what_is_missing():
  params = {"w": jnp.ones((4, 3))}
  tx = optax_rlx.kron(1e-2, weight_decay=1e-3)
  with pytest.raises(ValueError, match=r"kron: weight_decay=0.001 needs the params"):
    tx.update(params, tx.init(params))  # optax's own message named neither kron nor the option
  newton = optax_rlx.scale_by_kron(criterion="newton")
  with pytest.raises(ValueError, match=r"`obj_fn\(params\)` to return a real scalar.*float32\[3\]"):
    newton.update(params, newton.init(params), params, obj_fn=lambda p: p["w"].sum(0))


def test_bad_trees_raise_value_error_naming_the_leaf():
  tx = optax_rlx.scale_by_kron(key=0)
  params = {"w": jnp.zeros((4, 4)), "b": jnp.zeros(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['w'\].*\(4, 5\)"):
    tx.update({"w": jnp.zeros((4, 5)), "b": jnp.zeros(3)}, state)
  with pytest.raises(ValueError, match=r"\['c'\]"):
    tx.update({"w": jnp.zeros((4, 4)), "c": jnp.zeros(3)}, state)
  with pytest.raises(ValueError, match=r"\['i'\].*int32"):
    tx.init({"i": jnp.zeros(3, jnp.int32)})
  stacked = optax_rlx.scale_by_kron(stacked_layers=True, key=0)
  with pytest.raises(ValueError, match=r"\['s'\].*stacked"):
    stacked.init({"s": jnp.zeros(())})


@pytest.mark.parametrize("option", ["max_skew_dense", "dense_budget"])
def test_shape_deciding_options_under_inject_hyperparams_must_be_static(option):
  params = {"w": jnp.zeros((4, 12)), "b": jnp.zeros(64)}
  traced = optax.inject_hyperparams(optax_rlx.kron)(1e-3, **{option: 4.0})
  with pytest.raises(ValueError, match=rf"`{option}`.*static_args"):
    jax.jit(traced.init)(params)  # under jit the injected value is a tracer
  static = optax.inject_hyperparams(optax_rlx.kron, static_args=(option,))(1e-3, **{option: 4.0})
  plain = optax_rlx.kron(1e-3, **{option: 4.0})
  assert (jax.tree.structure(static.init(params).inner_state)
          == jax.tree.structure(plain.init(params)))
