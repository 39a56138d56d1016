"""Kron's cached preconditioner (``cache_precond=True``, off by default): ``Ps`` holds
``P_i = Q_iᴴ Q_i`` of the stored factors, refreshed at every refit and only then, and applying it
gives the uncached updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_rlx


def _params(rng, dtype=jnp.float32):
  # Dense-dense (8, 5), non-square with a diagonal long axis at the defaults (40, 4), a 3-D
  # tensor, a vector, a scalar and a stacked leaf.
  shapes = {"w": (8, 5), "tall": (40, 4), "t": (3, 4, 5), "v": (6,), "s": (), "stack": (2, 4, 3)}
  def make(shape):
    x = rng.standard_normal(shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      x = x + 1j * rng.standard_normal(shape)
    return jnp.asarray(x, dtype)
  return {k: make(s) for k, s in shapes.items()}


def _loss(params):
  return sum(jnp.sum(jnp.abs(jnp.sin(x)) ** 2 + 0.1 * jnp.abs(x) ** 4)
             for x in jax.tree.leaves(params))


STACKED = {"w": False, "tall": False, "t": False, "v": False, "s": False, "stack": True}


def _run(tx, params, steps):
  """Gradient descent steps with ``tx``; returns every step's updates and the last state."""
  state = tx.init(params)
  grad = jax.grad(_loss)

  @jax.jit
  def step(p, s):
    g = jax.tree.map(jnp.conj, grad(p))  # optax's convention for complex params
    u, s = tx.update(g, s, p, obj_fn=_loss)
    return optax.apply_updates(p, jax.tree.map(lambda x: -0.05 * x, u)), u, s

  updates = []
  for _ in range(steps):
    params, u, state = step(params, state)
    updates.append(u)
  return updates, state


def _product(q):
  """``Q_iᴴ Q_i`` (dense, possibly with a leading layer axis) or ``q_i²`` in float64."""
  q = np.asarray(q.astype(jnp.float32)) if q.dtype == jnp.bfloat16 else np.asarray(q)
  q = q.astype(np.complex128 if np.iscomplexobj(q) else np.float64)
  if q.ndim == 1 or (q.ndim == 2 and q.shape[-1] != q.shape[-2]):
    return q * q
  return np.conj(np.swapaxes(q, -1, -2)) @ q


def test_cache_is_opt_in_and_doubles_only_the_factors(rng):
  """Off by default (its memory goes to the dense factors of ``dense_budget``), on when asked,
  whatever the refit schedule."""
  params = _params(rng)
  assert optax_rlx.scale_by_kron().init(params).Ps == ()
  assert optax_rlx.scale_by_kron(cache_precond=False).init(params).Ps == ()
  cached = optax_rlx.scale_by_kron(cache_precond=True).init(params)
  forced = optax_rlx.scale_by_kron(precond_update_prob=1.0, cache_precond=True).init(params)
  # The groups of the factors, with their bytes: the cache doubles the factors' memory, no more.
  for state in (cached, forced):
    assert sorted(state.Ps) == sorted(state.Qs)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state.Ps) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state.Qs)


# Each geometry, dtype and factor precision once (not the full product: compile time).
@pytest.mark.parametrize("geometry, dtype, precond_dtype", [
    ("procrustes", jnp.float32, jnp.bfloat16), ("triangular", jnp.complex64, None)])
def test_cached_p_is_the_product_of_the_stored_factors(rng, geometry, dtype, precond_dtype):
  params = _params(rng, dtype)
  tx = optax_rlx.scale_by_kron(geometry=geometry, precond_dtype=precond_dtype,
                               stacked_layers=STACKED, precond_update_prob=0.5, key=1,
                               cache_precond=True)
  _, state = _run(tx, params, 7)
  rtol = 1e-5 if precond_dtype is None else 2e-2  # P itself is rounded to bfloat16
  options = dict(precond_dtype=precond_dtype, stacked_layers=STACKED, geometry=geometry)
  qs_of = optax_rlx.kron_by_leaf(state.Qs, params, **options)
  ps_of = optax_rlx.kron_by_leaf(state.Ps, params, **options)
  for key in params:
    qs, ps = qs_of[key], ps_of[key]
    for q, p in zip(qs, ps, strict=True):
      want = _product(q)
      scale = np.max(np.abs(want))
      got = np.asarray(p.astype(jnp.float32) if p.dtype == jnp.bfloat16 else p)
      np.testing.assert_allclose(got.astype(want.dtype), want, rtol=rtol,
                                 atol=rtol * scale, err_msg=key)
  # And the factors really moved away from the initial identity (else the test proves nothing).
  w = qs_of["w"][0]
  w = np.asarray(w.astype(jnp.float32) if w.dtype == jnp.bfloat16 else w)
  assert not np.allclose(w, w[0, 0] * np.eye(8), rtol=1e-2)


def test_cache_changes_only_at_refits(rng):
  params = _params(rng)
  tx = optax_rlx.scale_by_kron(precond_update_prob=0.25, key=0, cache_precond=True)
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, params)
  changed_p, changed_q = [], []
  differs = lambda a, b: any(not np.array_equal(x, y)  # noqa: E731
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  for i in range(9):
    before = state
    _, state = step(jax.tree.map(lambda g, i=i: g * (1.0 + i), grads), state)
    changed_p.append(differs(before.Ps, state.Ps))
    changed_q.append(differs(before.Qs, state.Qs))
  # The accumulator starts at 1 and gains 0.25 per step: refits at steps 0, 3, 7.
  assert changed_p == changed_q == [True, False, False, True, False, False, False, True, False]


# Refits on some steps (both branches of the refit's cond) and on every step (no cond).
@pytest.mark.parametrize("geometry, dtype, criterion, prob", [
    ("procrustes", jnp.complex64, "newton", 0.4), ("triangular", jnp.float32, "whitening", 1.0)])
def test_cached_and_uncached_updates_agree(rng, geometry, dtype, criterion, prob):
  params = _params(rng, dtype)
  options = dict(geometry=geometry, criterion=criterion, stacked_layers=STACKED,
                 precond_update_prob=prob, key=3)
  cached, s1 = _run(optax_rlx.scale_by_kron(cache_precond=True, **options), params, 12)
  plain, s2 = _run(optax_rlx.scale_by_kron(**options), params, 12)
  assert sorted(s1.Ps) == sorted(s1.Qs) and s2.Ps == ()
  for step, (a, b) in enumerate(zip(cached, plain, strict=True)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      # Same math, other rounding (Qᴴ(Q x) against (QᴴQ) x): float32 round-off, a little grown
      # by 12 steps of feedback through the params.
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3,
                                 atol=1e-4 * float(jnp.max(jnp.abs(y))), err_msg=str(step))


def test_bad_cache_option_and_mismatched_state_raise(rng):
  params = _params(rng)
  with pytest.raises(ValueError, match="cache_precond"):
    optax_rlx.scale_by_kron(cache_precond="yes")
  grads = jax.tree.map(jnp.ones_like, params)
  uncached = optax_rlx.scale_by_kron().init(params)
  with pytest.raises(ValueError, match="cache_precond=True"):
    optax_rlx.scale_by_kron(cache_precond=True).update(grads, uncached)
  cached = optax_rlx.scale_by_kron(cache_precond=True).init(params)
  with pytest.raises(ValueError, match="cache_precond=False"):
    optax_rlx.scale_by_kron().update(grads, cached)
