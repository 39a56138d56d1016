"""One Kron step (``_kron_update``): the update is ``P m̂`` with ``P`` before the step's refit, in
every geometry and criterion; units of any leaves are fitted by group; the refit's work stays
conditional where it must."""

import jax
import jax.numpy as jnp
import kron_reference
import numpy as np
import optax
import pytest

import optax_rlx


def _precondition_f64(factors, x):
  return kron_reference.precondition([np.asarray(q, np.float64) for q in factors], x)


def _objective(params):
  return sum(jnp.sum(jnp.sin(x) ** 2 + 0.1 * x**4) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("options", [
    {},  # procrustes whitening on the momentum: the fit's own P h̃ is the update
    {"precond_update_prob": 0.5},  # refits every other step: both branches of the cond
    {"precond_fit_on": "gradient"},
    {"criterion": "newton"},
    {"geometry": "triangular"},
    {"geometry": "triangular", "criterion": "newton"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_every_refit_step_updates_with_p_before_the_fit(rng, options):
  """``clip(P m̂)`` with ``P`` of the factors the step starts from, on refit steps (every step
  with the default schedule's first 200) and the others, in float64 NumPy, on a non-square
  matrix, a vector and a rank-1 matrix; from step 2 on (step 1 also sets the initial scale). The
  factors move at every refit, so ``P`` after the fit would miss by far more than the
  tolerance."""
  shapes = {"w": (12, 5), "b": (7,), "r": (16, 9)}
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  tx = optax_rlx.scale_by_kron(key=0, **options)
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params, obj_fn=_objective))
  m = {k: np.zeros(s) for k, s in shapes.items()}
  moved = []
  for t in range(1, 7):
    g = {k: rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 3) for k, s in shapes.items()}
    g["r"] = np.outer(rng.standard_normal(16), rng.standard_normal(9))
    before = optax_rlx.kron_by_leaf(state.Qs, params, **options)
    u, state = step({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state)
    after = optax_rlx.kron_by_leaf(state.Qs, params, **options)
    for k in shapes:
      m[k] = 0.9 * m[k] + 0.1 * np.asarray(g[k], np.float32)
      if t == 1:
        continue
      expected = _precondition_f64(before[k], m[k] / (1 - 0.9**t))
      expected /= max(1.0, np.sqrt(np.mean(expected**2)) / 1.1)
      np.testing.assert_allclose(np.asarray(u[k]), expected, rtol=2e-4,
                                 atol=2e-5 * np.abs(expected).max(), err_msg=f"{k}, step {t}")
      with_after = _precondition_f64(after[k], m[k] / (1 - 0.9**t))
      moved.append(np.abs(with_after - _precondition_f64(before[k], m[k] / (1 - 0.9**t))).max()
                   / np.abs(with_after).max())
  assert max(moved) > 1e-2  # P before and after a fit differ by far more than round-off


def _square_matmuls(jaxpr, n, inside_cond=False):
  """``(inside a cond?)`` for every ``dot_general`` of two ``(..., n, n)`` operands."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and all(
        tuple(v.aval.shape[-2:]) == (n, n) for v in eqn.invars):
      found.append(inside_cond)
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _square_matmuls(inner, n, inside_cond or eqn.primitive.name == "cond")
  return found


def test_a_low_rank_factor_is_rotated_in_full_only_under_a_cond():
  """At the default structure a skewed axis the budget makes dense (here the 64-axis of an
  (8, 64) leaf, 64² > 2 · 512) takes the low-rank procrustes step: its rotation acts along the
  step's rank-16 generator, and the residual asymmetry is removed by a full rotation (two
  (64, 64) matmuls per unit) only when it is needed: one ``lax.cond`` per group. Under the
  group's vmap a per-factor cond becomes a select that rotates every factor at every refit (2n³
  flops each; once 1.85x kron_speed.py's whole update).

  ``precond_update_prob=1.0`` is the test's subject: with a schedule the whole refit sits in a
  cond of its own, and every matmul with it."""
  params = {"w": jnp.ones((8, 64)), "bias": jnp.ones(4096)}  # the vector lifts the budget
  tx = optax_rlx.scale_by_kron(precond_update_prob=1.0)
  state = tx.init(params)
  assert [q.shape for q in optax_rlx.kron_by_leaf(state.Qs, params)["w"]] == [(8, 8), (64, 64)]
  square = _square_matmuls(jax.make_jaxpr(tx.update)(params, state, params).jaxpr, 64)
  assert square and all(square), square  # full rotations exist, and only inside a cond


def _params(rng):
  shapes = {"a": (6, 4), "b": (6, 4), "c": (4, 6), "v": (4,), "u": (4,), "s": (),
            "stack": (3, 6, 4), "blk": (12, 4)}
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _loss(params):
  return sum(jnp.sum(jnp.sin(3.0 * x) + 0.5 * x**2) for x in jax.tree.leaves(params))


def _run(tx, params, steps=6):
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p, obj_fn=_loss))
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params, state


def test_grouped_fitting_equals_one_optimizer_per_leaf(rng):
  """Leaves fitted in one group move as each does alone: the same math per unit. (Procrustes
  whitening, where the probe is integrated out: only the damping noise, of relative size 1e-9,
  differs with the key split. Triangular geometry and Newton draw their probes per leaf, so
  there the split changes the draws; the padding test below covers them.)"""
  params = {k: v for k, v in _params(rng).items() if k in ("a", "b", "v", "u")}
  options = dict(key=0, precond_update_prob=1.0)
  together, state = _run(optax_rlx.kron(1e-2, **options), params)
  assert sorted(state[0].Qs) == ["4_float32", "6x6_4x4_float32"]  # {a, b} and {v, u}
  for name in params:
    alone, _ = _run(optax_rlx.kron(1e-2, **options), {name: params[name]})
    np.testing.assert_allclose(together[name], alone[name], rtol=1e-5, atol=1e-6, err_msg=name)


# Each geometry and each criterion once (not the full product: compile time).
@pytest.mark.parametrize("geometry, criterion", [("procrustes", "newton"),
                                                 ("triangular", "whitening")])
def test_group_multiple_pads_groups_and_leaves_the_updates_unchanged(rng, geometry, criterion):
  params = _params(rng)
  options = dict(key=0, stacked_layers={k: k == "stack" for k in params}, block_size=6,
                 geometry=geometry, criterion=criterion)
  p_plain, s_plain = _run(optax_rlx.kron(1e-2, **options), params)
  p_padded, s_padded = _run(optax_rlx.kron(1e-2, group_multiple=4, **options), params)
  plain_sizes = {k: v[0].shape[0] for k, v in s_plain[0].Qs.items()}
  padded_sizes = {k: v[0].shape[0] for k, v in s_padded[0].Qs.items()}
  kind = "_triangular" if geometry == "triangular" else ""  # dense factors' kind in the name
  assert plain_sizes == {f"6x6_4x4_float32{kind}": 7, f"4x4_6x6_float32{kind}": 1,
                         "4_float32": 2, "1_float32": 1}
  assert padded_sizes == {k: -(-n // 4) * 4 for k, n in plain_sizes.items()}
  for name in params:
    np.testing.assert_allclose(p_padded[name], p_plain[name], rtol=1e-6, atol=1e-7)
  for q in jax.tree.leaves(s_padded[0].Qs):  # padding units too
    assert np.all(np.isfinite(np.asarray(q)))
  per_leaf = optax_rlx.kron_by_leaf(s_padded[0].Qs, params, group_multiple=4, **options)
  assert jax.tree.map(np.shape, per_leaf) == jax.tree.map(
      np.shape, optax_rlx.kron_by_leaf(s_plain[0].Qs, params, **options))
