"""Sharded params on 8 simulated CPU devices give the unsharded results (Auto and Explicit meshes).

JAX fixes the device count when its backend starts, so the check runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import optax_rlx

    assert jax.device_count() == 8, jax.devices()
    kind = getattr(AxisType, sys.argv[1])
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
    jax.set_mesh(mesh)
    params = {
        "w": jnp.arange(64 * 16.0).reshape(64, 16) / 1e3,
        "sq": jnp.ones((8, 8)) + jnp.eye(8),
        "big": jnp.arange(136 * 128.0).reshape(136, 128) / 1e4,
        "b": jnp.ones(16),
    }
    specs = {"w": P("data", "model"), "sq": P(None, "model"), "big": P("data", "model"),
             "b": P("model")}
    sharded = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in specs.items()})

    def loss(p):
      return sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree.leaves(p))

    configs = {
        "adafactor": optax_rlx.adafactor(1e-2),
        "adafactor-momentum": optax_rlx.adafactor(1e-2, b1=0.9, min_dim_size_to_factor=4),
        "kron": optax_rlx.kron(1e-3, key=0, precond_update_prob=1.0),
        "kron-dense-procrustes": optax_rlx.kron(
            1e-3, key=0, precond_update_prob=1.0, max_skew_dense=float("inf")),
        "kron-dense-triangular": optax_rlx.kron(
            1e-3, key=0, precond_update_prob=1.0, max_skew_dense=float("inf"),
            geometry="triangular"),
        "kron-newton": optax_rlx.kron(
            1e-3, key=0, precond_update_prob=1.0, criterion="newton",
            max_skew_dense=float("inf")),
    }
    for name, tx in configs.items():
      step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, obj_fn=loss))
      plain, dist = tx.init(params), jax.jit(tx.init)(sharded)
      for _ in range(3):
        u_plain, plain = step(jax.grad(loss)(params), plain, params)
        u_dist, dist = step(jax.jit(jax.grad(loss))(sharded), dist, sharded)
        for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_dist)):
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6,
                                     err_msg=name)
      print("ok", name)
    """
)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_params_give_unsharded_results(axis_type):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", SCRIPT, axis_type], env=env, capture_output=True, text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("ok ") == 6, result.stdout
