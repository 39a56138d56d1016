"""Kron as users run it: ``scale_by_kron()`` / ``kron(lr)`` with every default left alone.

Each test here reaches a claim of the README at the defaults, on non-square, 3-D and
rank-deficient shapes and over the whole float32 range; the other Kron tests switch options to
isolate one mechanism. Measured values behind the thresholds are in the comments.
"""

import math

import jax
import jax.numpy as jnp
import kron_reference
import numpy as np
import optax
import pytest
from kron_helpers import GEOMETRIES, one_unit

import optax_rlx
from optax_rlx import _kron_numerics


def _rotated(rng, n, cond):
  """``U diag(s) Vᵀ`` with random rotations and ``cond(M Mᵀ) = cond``."""
  u, _ = np.linalg.qr(rng.standard_normal((n, n)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return (u @ np.diag(np.logspace(0, math.log10(cond) / 2, n)) @ v.T).astype(np.float32)


def _factors(state):
  qs = one_unit(state.Qs)
  return tuple(q.astype(jnp.float32) for q in qs), tuple(q.ndim == 2 for q in qs)


def _side_condition(u):
  """Per axis, the condition number of the mode-k covariance of samples ``u`` (samples first)."""
  out = []
  for axis in range(1, u.ndim):
    moved = np.moveaxis(np.asarray(u, np.float64), axis, 1)
    flat = moved.reshape(moved.shape[0], moved.shape[1], -1)
    e = np.linalg.eigvalsh(np.einsum("sik,sjk->ij", flat, flat))
    out.append(e[-1] / e[0])
  return out


# ---------------------------------------------------------------------------------------------
# Structure: small non-square matrices get dense factors on both sides.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 12), (12, 24), (64, 32), (6, 5, 4), (3, 3, 16, 32)])
def test_default_structure_is_dense_on_every_axis_of_small_tensors(shape):
  state = optax_rlx.scale_by_kron().init(jnp.zeros(shape))
  assert [q.shape for q in one_unit(state.Qs)] == [(d, d) for d in shape]


@pytest.mark.parametrize("shape, expected", [
    ((256, 16), [(256,), (16, 16)]),  # an embedding-like axis 16x longer: diagonal
    ((50257, 768), [(50257,), (768, 768)]),  # a vocabulary, above max_size_dense too
    ((7,), [(7,)]),
])
def test_default_structure_keeps_long_skewed_axes_diagonal(shape, expected):
  params = jax.ShapeDtypeStruct(shape, jnp.float32)
  state = jax.eval_shape(optax_rlx.scale_by_kron().init, params)
  assert [q.shape for q in optax_rlx.kron_by_leaf(state.Qs, params)] == expected


def _shapes(tree):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def _gpt2_small():
  d, vocab, ctx = 768, 50257, 1024
  params = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f": [(d,), (d,)]}
  for i in range(12):
    params[f"h{i}"] = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                       (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
  return _shapes(params)


def _llama_like(d, ffn, layers, vocab, kv):
  """Separate q, k, v, o projections (grouped k, v) and a gated MLP of width ``ffn``."""
  params = {"embed": (vocab, d), "head": (d, vocab)}
  for i in range(layers):
    params[f"l{i}"] = [(d, d), (d, kv), (d, kv), (d, d), (d, ffn), (d, ffn), (ffn, d), (d,), (d,)]
  return _shapes(params)


def _small_lm():
  """compare.py's stdlib LM: d = 64, 2 layers, a fused (64, 192) qkv, 4x MLP, vocabulary 256."""
  d, vocab, ctx = 64, 256, 64
  params = {"embed": (vocab, d), "pos": (ctx, d), "ln_f": (d,), "head": (d, vocab)}
  for i in range(2):
    params[f"block{i}"] = {"ln1": (d,), "ln2": (d,), "qkv": (d, 3 * d), "proj": (d, d),
                           "fc": (d, 4 * d), "fc_b": (4 * d,), "out": (4 * d, d)}
  return _shapes(params)


def _state_ratio(params, **kw):
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
  return nbytes(jax.eval_shape(optax_rlx.kron(1e-3, **kw).init, params)) / nbytes(params)


@pytest.mark.parametrize("name, params, measured", [
    ("gpt2_small", _gpt2_small(), 1.82),  # psgd_jax's all-dense structure: 3.64
    ("tinyllama_like", _llama_like(2048, 5632, 22, 32000, 256), 1.77),
    ("llama_like_512", _llama_like(512, 1408, 8, 32000, 512), 1.95),
    ("small_lm", _small_lm(), 1.98),
])
def test_default_state_stays_within_adams_memory(name, params, measured):
  """Kron's default state <= Adam's (2x the params' bytes) on transformer shapes, with the
  skewed axes the budget admits; the former per-leaf rule 3.0 (which makes the same (d, 3d)
  axes dense) gives 3.50x on the TinyLlama-like shapes, the cached P 2.53x."""
  ratio = _state_ratio(params)
  assert 1.0 < ratio <= 2.0, (name, ratio)
  assert ratio == pytest.approx(measured, abs=0.01)


def test_default_budget_makes_the_least_skewed_axes_dense():
  """GPT-2's fused (768, 2304) attention projection and the small LM's (64, 192) are dense on
  both sides by default; 4x MLP axes, vocabularies and positions stay diagonal."""
  def factor_shapes(params):
    state = jax.eval_shape(optax_rlx.scale_by_kron().init, params)
    return jax.tree.map(lambda q: q.shape, optax_rlx.kron_by_leaf(state.Qs, params),
                        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))

  gpt2 = factor_shapes(_gpt2_small())
  assert gpt2["h0"][2] == ((768, 768), (2304, 2304))
  assert gpt2["h0"][8] == ((768, 768), (3072,)) and gpt2["wte"] == ((50257,), (768, 768))
  lm = factor_shapes(_small_lm())
  assert lm["block1"]["qkv"] == ((64, 64), (192, 192))
  assert lm["block1"]["fc"] == ((64, 64), (256,)) and lm["embed"] == ((256,), (64, 64))
  # The budget off: the per-leaf rule alone (the former default).
  off = jax.eval_shape(optax_rlx.scale_by_kron(dense_budget=0.0).init, _small_lm())
  off_factors = optax_rlx.kron_by_leaf(off.Qs, _small_lm(), dense_budget=0.0)
  assert off_factors["block1"]["qkv"][1].shape == (192,)


# ---------------------------------------------------------------------------------------------
# Fixed points at the defaults.
# ---------------------------------------------------------------------------------------------


def _whitened_conditions(tx, sample, shape, fit_steps=2000, num_samples=3000):
  state = tx.init(jnp.zeros(shape))

  def body(state, k):
    return tx.update(sample(k), state)[1], None

  state = jax.jit(lambda s, ks: jax.lax.scan(body, s, ks)[0])(
      state, jax.random.split(jax.random.key(0), fit_steps))
  factors, dense = _factors(state)
  G = jax.vmap(sample)(jax.random.split(jax.random.key(1), num_samples))
  U = jax.vmap(lambda g: _kron_numerics.precondition(factors, g, dense))(G)
  return _side_condition(G), _side_condition(U)


@pytest.mark.parametrize("shape", [(24, 12), (12, 24), (6, 5, 4)])
def test_whitening_fixed_point_at_defaults(rng, shape):
  """G = A₁ ⊗ A₂ (⊗ A₃) z with cond(AᵢAᵢᵀ) = 1e3: P G's covariance on every side is whitened.

  Measured at the defaults (momentum, refit schedule, clipping, precond_lr 0.1 all on): the
  worst side's condition goes from > 1e3 to 4.1 / 4.3 / 1.9 (the fit's noise at a constant
  precond_lr; the former skew rule left the long side of (24, 12) at ~500).
  """
  mats = [jnp.asarray(_rotated(rng, d, 1e3)) for d in shape]

  def sample(k):
    z = jax.random.normal(k, shape)
    for axis, a in enumerate(mats):
      z = jnp.moveaxis(jnp.tensordot(a, z, axes=(1, axis)), 0, axis)
    return z

  raw, white = _whitened_conditions(optax_rlx.scale_by_kron(), sample, shape)
  assert min(raw) > 300, raw
  assert max(white) <= 6.0, white


@pytest.mark.parametrize("shape", [(24, 12), (12, 24)])
def test_newton_fixed_point_at_defaults(rng, shape):
  """f(W) = ½‖A W B‖²: H⁻¹ g = W, so P g must align with W (cosine measured 0.9999)."""
  m, n = shape
  A, B = jnp.asarray(_rotated(rng, m, 1e2)), jnp.asarray(_rotated(rng, n, 1e2))

  def loss(w):
    return 0.5 * jnp.sum((A @ w @ B) ** 2)

  tx = optax_rlx.scale_by_kron(criterion="newton")
  w0 = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  state = tx.init(w0)

  def body(state, _):
    return tx.update(jax.grad(loss)(w0), state, w0, obj_fn=loss)[1], None

  state = jax.jit(lambda s: jax.lax.scan(body, s, None, length=2000)[0])(state)
  factors, dense = _factors(state)
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  g = jax.grad(loss)(w)
  pg = np.asarray(_kron_numerics.precondition(factors, g, dense)).ravel()
  target = np.asarray(w).ravel()
  cosine = pg @ target / (np.linalg.norm(pg) * np.linalg.norm(target))
  raw = np.asarray(g).ravel() @ target / (np.linalg.norm(g) * np.linalg.norm(target))
  assert raw < 0.8, raw  # the problem is ill-conditioned
  assert cosine >= 0.99, cosine


# ---------------------------------------------------------------------------------------------
# Rank-deficient gradients with dense factors: every geometry solves them.
# ---------------------------------------------------------------------------------------------


def _rosenbrock(p):
  return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2


def _train(loss, params, tx, steps):
  def step(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), value

  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=steps))
  (params, state), losses = run(params)
  return np.asarray(losses), params, state


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("lr", [0.01])  # 0.01 stalled before; 0.03 measured < 1e-13 too
def test_rank_deficient_dense_factors_are_solved_by_every_geometry(geometry, lr):
  """64 Rosenbrocks as one (2, 64) param with a dense 64 x 64 factor, whose gradient Gram has
  rank <= 2 every step. Measured final loss at 3000 steps, cosine schedule: <= 1e-11 for both
  geometries at both lrs (before the scale-free damping, procrustes stalled at 0.02-0.07 at
  lr 0.01)."""
  p0 = jax.random.uniform(jax.random.key(0), (2, 64), minval=jnp.array([[-2.0], [-1.0]]),
                          maxval=jnp.array([[2.0], [3.0]]))
  tx = optax_rlx.kron(optax.cosine_decay_schedule(lr, 3000), geometry=geometry,
                      max_skew_dense=math.inf)
  losses, _, state = _train(lambda p: jnp.mean(_rosenbrock(p)), p0, tx, 3000)
  assert one_unit(state[0].Qs)[1].shape == (64, 64)
  assert losses[-1] < 1e-8, losses[-1]


# ---------------------------------------------------------------------------------------------
# Dynamic range: the same direction for gradients scaled by 10^k, k = -30 ... 30.
# ---------------------------------------------------------------------------------------------


def _updates_at_scale(tx, grads_seq, scale):
  params = [jnp.zeros(g.shape) for g in grads_seq[0]]
  state = tx.init(params)
  update = jax.jit(tx.update)
  for grads in grads_seq:
    out, state = update([g * jnp.float32(scale) for g in grads], state, params)
  return out, state


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_gradients_over_the_float32_range_give_finite_state_and_the_same_direction(rng, geometry):
  """Scaled by 10^k, k = -30 ... 30, and to the ends of float32's normal range: the largest
  entry at float32's maximum (3.4e38), and the smallest at 1.2e-37, where the momentum's
  (1 - b1) g is still a normal float (XLA flushes subnormal results to zero). Before 2026-12-04
  the top end broke the vector's P (q² underflowed) and the triangular fit (its Lipschitz
  estimates, ~|h|, overflowed): norms off by 5-25%."""
  shapes = [(6, 4), (24, 12), (5,), (3, 4, 5), ()]
  grads_seq = [[jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
               for _ in range(12)]
  entries = np.abs(np.concatenate([np.ravel(g) for grads in grads_seq for g in grads]))
  ends = [1.2e-37 / entries.min(), 0.999 * float(jnp.finfo(jnp.float32).max) / entries.max()]
  tx = optax_rlx.scale_by_kron(geometry=geometry)
  reference, _ = _updates_at_scale(tx, grads_seq, 1.0)
  for k in [*range(-30, 31, 5), *np.log10(ends)]:
    out, state = _updates_at_scale(tx, grads_seq, 10.0**k)
    for leaf in jax.tree.leaves(state):
      if jnp.issubdtype(leaf.dtype, jnp.inexact):
        assert bool(jnp.all(jnp.isfinite(leaf))), (k, leaf)
    for u, r in zip(out, reference, strict=True):
      assert bool(jnp.all(jnp.isfinite(u))), k
      cosine = float(jnp.vdot(u, r) / (jnp.linalg.norm(u) * jnp.linalg.norm(r)))
      assert cosine > 0.999, (k, u.shape, cosine)
      np.testing.assert_allclose(float(jnp.linalg.norm(u)), float(jnp.linalg.norm(r)),
                                 rtol=1e-3)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("b1", [0.9, None])
def test_gradients_below_the_normal_range_leave_the_state_finite_and_training_resumes(
    geometry, b1):
  """40 steps of gradients ~1e-38 (mostly subnormal: XLA flushes them to zero), then normal ones,
  on a 24×12 matrix, a vector, a 3-D tensor and a scalar. Before 2026-12-04 the dense factor
  turned NaN for good: the Procrustes rotation normalised an asymmetry of ~1e-20 by its
  underflowed norm. With momentum, (1 - b1) g flushes to zero and the fit sees no target;
  ``b1=None`` fits on the tiny gradient itself: a unit's first nonzero target sets its initial
  scale, P ~ 1e38 for the vector. The gradients that follow are 1e-2 (36 decades up): P m̂ is
  formed before the clip, so a jump over float32's whole range (1e-38 to ~4) overflows it."""
  rng = np.random.default_rng(5)
  shapes = {"w": (24, 12), "b": (7,), "t": (3, 4, 5), "s": ()}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  tx = optax_rlx.scale_by_kron(geometry=geometry, b1=b1)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(60):
    scale = np.float32(1e-38 if i < 40 else 1e-2)
    grads = {k: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
             for k, s in shapes.items()}
    updates, state = step(grads, state)
    for leaf in jax.tree.leaves((updates, state)):
      if jnp.issubdtype(leaf.dtype, jnp.inexact):
        assert bool(jnp.all(jnp.isfinite(leaf))), i
  # Whitened and clipped: RMS at most 1.1, and well above zero (the momentum, zero through the
  # flushed stretch, is 1 - 0.9^20 of the way back: measured 0.28-1.1).
  for u in updates.values():
    assert 0.1 < float(jnp.sqrt(jnp.mean(u**2))) <= 1.1 * (1 + 1e-6)


@pytest.mark.parametrize("k", [-30, 30])
def test_extreme_gradients_train_as_well_as_unit_ones(k):
  """kron(lr) on a loss scaled by 10^k follows the same path (whitening is scale-free)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 12)) @ _rotated(rng, 12, 1e3), jnp.float32)
  y = x @ jnp.asarray(rng.standard_normal((12, 6)), jnp.float32)
  scale = jnp.float32(10.0**k)

  def loss(w):
    return scale * jnp.mean((x @ w - y) ** 2)

  w0 = jnp.zeros((12, 6))
  tx = optax_rlx.kron(optax.cosine_decay_schedule(0.01, 300))
  unit_losses, w_unit, _ = _train(lambda w: jnp.mean((x @ w - y) ** 2), w0, tx, 300)
  scaled_losses, w_scaled, state = _train(loss, w0, tx, 300)
  assert all(bool(jnp.all(jnp.isfinite(q))) for q in jax.tree.leaves(state))
  # Round-off of the 10^k scaling (not a power of two) grows along the trajectory: the paths
  # agree to ~3% in the weights (measured 0.03 max abs) and the losses to a factor well below 2.
  np.testing.assert_allclose(np.asarray(w_scaled), np.asarray(w_unit), atol=0.1)
  unit_final, scaled_final = unit_losses[-1], scaled_losses[-1] / 10.0**k
  assert unit_final < 0.05 * unit_losses[0]  # it trains (measured 2408 → 47)
  assert 0.5 < scaled_final / unit_final < 2.0, (scaled_final, unit_final)


# ---------------------------------------------------------------------------------------------
# Kron beats Adam where curvature is rotated and ill-conditioned.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 32), (24, 48)])
def test_default_kron_beats_adam_100x_on_rotated_non_square_least_squares(shape):
  """min ½‖X W − Y‖², X with rotated features (cond(XᵀX) = 1e4), W non-square; both at their
  best lr of a 3-point grid, cosine decay, 1000 steps."""
  n_in, n_out = shape
  rng = np.random.default_rng(1)
  x = rng.standard_normal((512, n_in)) @ _rotated(rng, n_in, 1e4)
  x = jnp.asarray(x / np.sqrt(np.mean(x**2)), jnp.float32)
  y = x @ jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32)
  baseline = float(jnp.mean(y**2))

  def loss(w):
    return jnp.mean((x @ w - y) ** 2) / baseline

  def best(make, lrs):
    finals = [_train(loss, jnp.zeros(shape), make(optax.cosine_decay_schedule(lr, 1000)), 1000)[0]
              for lr in lrs]
    return min(float(np.mean(f[-10:])) for f in finals)

  kron_loss = best(optax_rlx.kron, (3e-3, 1e-2, 3e-2))
  adam_loss = best(optax.adam, (1e-2, 3e-2, 1e-1))
  assert kron_loss * 100 <= adam_loss, (kron_loss, adam_loss)


# ---------------------------------------------------------------------------------------------
# The whole update at the defaults against a float64 NumPy Kron.
# ---------------------------------------------------------------------------------------------


def test_default_updates_and_factors_follow_a_float64_numpy_kron():
  """``scale_by_kron()`` on a non-square matrix, a 3-D tensor, a (40, 4) matrix whose long axis
  is diagonal, a vector and a scalar, for 8 steps of random gradients spanning 1e-3 ... 1e3,
  against :class:`kron_reference.DefaultKron`: momentum, the initial scale, one fitting step per
  step on every factor (Lipschitz estimates carried, factors rebalanced), ``P`` before the fit,
  the RMS clip. Agreement to float32 round-off grown by 8 steps of feedback."""
  rng = np.random.default_rng(4)
  shapes = {"w": (8, 5), "t": (3, 4, 5), "tall": (40, 4), "b": (7,), "s": ()}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  tx = optax_rlx.scale_by_kron()
  state = tx.init(params)
  dense_of = {k: tuple(q.ndim == 2 for q in qs)
              for k, qs in optax_rlx.kron_by_leaf(state.Qs, params).items()}
  assert dense_of["tall"] == (False, True) and dense_of["t"] == (True, True, True)
  reference = kron_reference.DefaultKron(dense_of)
  step = jax.jit(tx.update)
  for t in range(8):
    grads = {k: rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 3) for k, s in shapes.items()}
    updates, state = step({k: jnp.asarray(g, jnp.float32) for k, g in grads.items()}, state)
    expected = reference.update({k: np.asarray(g, np.float32) for k, g in grads.items()})
    for k in shapes:
      want = expected[k]
      np.testing.assert_allclose(np.asarray(updates[k]), want, rtol=5e-4,
                                 atol=5e-5 * np.abs(want).max(), err_msg=f"{k}, step {t}")
  factors = optax_rlx.kron_by_leaf(state.Qs, params)
  for k in shapes:
    for got, want in zip(factors[k], reference.factors[k], strict=True):
      assert np.abs(want - np.eye(want.shape[0]) * want[0, 0] if want.ndim == 2 else want).max(
      ) > 1e-3  # the factors moved
      np.testing.assert_allclose(np.asarray(got), want, rtol=5e-4,
                                 atol=5e-5 * np.abs(want).max(), err_msg=k)


# ---------------------------------------------------------------------------------------------
# Quiet stretches: training resumes as if they had not happened.
# ---------------------------------------------------------------------------------------------


def test_training_resumes_after_a_stretch_of_zero_gradients():
  """Least squares (cond 1e4, rotated), 100 steps, then 300 steps of exactly zero gradients (a
  frozen-then-unfrozen layer), then 100 steps: the loss ends level with 200 uninterrupted steps.
  Before 2026-12-04 the whitening fit followed the momentum's decay through the stretch (P grew
  by decades, ill-conditioned along the last gradient) and needed hundreds of refits to recover:
  measured final loss 2.6e-2 after 100 zero steps and 0.67 after 1000, against 1.6e-3 without
  the stretch; now 1.1e-3 and 2.1e-3 (the momentum restarts from zero, which helps a little)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((256, 32)) @ _rotated(rng, 32, 1e4)
  x = jnp.asarray(x / np.sqrt(np.mean(x**2)), jnp.float32)
  y = x @ jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)

  def loss(w):
    return jnp.mean((x @ w - y) ** 2) / jnp.mean(y**2)

  tx = optax_rlx.kron(1e-2)

  @jax.jit
  def step(w, state, scale):
    updates, state = tx.update(scale * jax.grad(loss)(w), state, w)
    return optax.apply_updates(w, updates), state

  def run(quiet_steps):
    w = jnp.zeros((32, 16))
    state = tx.init(w)
    for scale, steps in ((1.0, 100), (0.0, quiet_steps), (1.0, 100)):
      for _ in range(steps):
        w, state = step(w, state, jnp.float32(scale))
    return float(loss(w))

  uninterrupted, resumed = run(0), run(300)
  assert uninterrupted < 5e-3  # it trains (measured 1.6e-3)
  assert resumed < 2.0 * uninterrupted, (resumed, uninterrupted)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_a_leaf_whose_gradient_starts_at_zero_gets_the_initial_scale_when_it_arrives(geometry):
  """Zero-initialised branches (LoRA's B = 0 makes A's gradient exactly 0, ReZero-style gates,
  a layer unfrozen later) have no gradient on the first steps. Their factors get the automatic
  initial scale on their first nonzero target, as a fresh kron's do on step 0: P's scale, ~1/|g|,
  matches. Before 2026-12-04 only step 0 was scaled, so such leaves kept unit factors (P ~ 1
  against ~1e3 here) and grew them at the fit's pace."""
  rng = np.random.default_rng(0)
  grads = {"w": jnp.asarray(rng.standard_normal((24, 12)) * 1e-3, jnp.float32),
           "b": jnp.asarray(rng.standard_normal(7) * 1e-3, jnp.float32)}
  zeros = jax.tree.map(jnp.zeros_like, grads)
  tx = optax_rlx.scale_by_kron(geometry=geometry, b1=None)
  step = jax.jit(tx.update)

  def precond_scale(zero_steps):
    state = tx.init(grads)
    for _ in range(zero_steps):
      _, state = step(zeros, state)
    _, state = step(grads, state)
    return {name: math.prod(float(jnp.max(jnp.abs(q))) ** 2 for q in qs)
            for name, qs in state.Qs.items()}

  fresh, delayed = precond_scale(0), precond_scale(5)
  for name in fresh:
    assert fresh[name] > 100, (name, fresh)  # the scale is the gradients', not 1
    assert 0.5 < delayed[name] / fresh[name] < 2, (name, delayed, fresh)
