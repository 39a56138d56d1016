"""Checks run with jaxlib's default XLA flags (not the suite's optimisation level 0), in a fresh
process started by ``tests/test_default_flags.py``; prints ``ok <check>`` for each that passes.

1. A jitted triangular Kron step on six groups of dense factors finishes: jaxlib 0.10.2's batched
   CPU triangular solve deadlocked such programs (see
   ``optax_rlx._kron_geometry._triangular_solve``); level 0 hid it (4 of 5 clean runs).
2. Gradients at both ends of float32's normal range give the unit-scale updates' direction and
   norm, in both geometries.
"""

import jax
import jax.numpy as jnp
import numpy as np

import optax_rlx


def triangular_step_finishes() -> None:
  # Within the default 2:1 skew, so every factor is dense at the defaults: six groups.
  shapes = [(64, 64), (80, 48), (72, 40), (48, 80), (72, 72), (56, 88)]
  params = {f"{i}_{k}": 0.01 * jnp.ones(s) for i, s in enumerate(shapes) for k in range(4)}
  tx = optax_rlx.kron(1e-3, geometry="triangular", precond_update_prob=1.0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = jax.tree.map(lambda p: jnp.sin(3.0 * p + 1.0), params)
  for _ in range(20):
    updates, state = step(grads, state, params)
    jax.block_until_ready(updates)
  print("ok triangular", flush=True)


def float32_range_is_scale_free() -> None:
  rng = np.random.default_rng(0)
  shapes = [(6, 4), (24, 12), (5,), (3, 4, 5), ()]
  seq = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(8)]
  entries = np.abs(np.concatenate([np.ravel(g) for grads in seq for g in grads]))
  for geometry in ("procrustes", "triangular", "quad"):
    tx = optax_rlx.scale_by_kron(geometry=geometry)

    def run(scale, tx=tx):
      params = [jnp.zeros(s) for s in shapes]
      state, update = tx.init(params), jax.jit(tx.update)
      for grads in seq:
        out, state = update([jnp.asarray(g * np.float32(scale)) for g in grads], state, params)
      return out, state

    reference, _ = run(1.0)
    for scale in (1.2e-37 / entries.min(), 0.999 * 3.4028235e38 / entries.max()):
      out, state = run(scale)
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((out, state))
                 if jnp.issubdtype(x.dtype, jnp.inexact)), (geometry, scale)
      for u, r in zip(out, reference, strict=True):
        cosine = float(jnp.vdot(u, r) / (jnp.linalg.norm(u) * jnp.linalg.norm(r)))
        assert cosine > 0.999, (geometry, scale, u.shape, cosine)
        np.testing.assert_allclose(float(jnp.linalg.norm(u)), float(jnp.linalg.norm(r)),
                                   rtol=1e-3)
  print("ok float32 range", flush=True)


if __name__ == "__main__":
  triangular_step_finishes()
  float32_range_is_scale_free()
