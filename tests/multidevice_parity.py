"""Sharded params on 8 simulated CPU devices give the unsharded results, for the Kron
configurations the other multi-device checks do not shard (dense triangular, Newton).

Run by ``tests/test_sharding.py`` in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``:
``python tests/multidevice_parity.py Auto|Explicit``.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_rlx


def main(axis_type: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  kind = getattr(AxisType, axis_type)
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

  # The configurations no other test here shards: adafactor (with momentum), the default kron
  # and the cached P run in SCALE_SCRIPT and GROUP_SCRIPT below.
  configs = {
      "kron-dense-triangular": optax_rlx.kron(
          1e-3, key=0, precond_update_prob=1.0, max_skew_dense=float("inf"),
          geometry="triangular"),
      "kron-newton": optax_rlx.kron(
          1e-3, key=0, precond_update_prob=1.0, criterion="newton",
          max_skew_dense=float("inf")),
  }
  for name, tx in configs.items():
    step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, obj_fn=loss))
    init, grad = jax.jit(tx.init), jax.jit(jax.grad(loss))
    plain, dist = init(params), init(sharded)
    for _ in range(3):
      u_plain, plain = step(grad(params), plain, params)
      u_dist, dist = step(grad(sharded), dist, sharded)
      for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_dist), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6,
                                   err_msg=name)
    print("ok", name)


if __name__ == "__main__":
  main(sys.argv[1])
