"""One of two processes (4 CPU devices each) of ``tests/test_multiprocess.py``: a sharded train
step of kron and adafactor over the 8 devices of both, equal to the same step unsharded on one
device, and an Orbax save/restore of the sharded state across the processes.

``python tests/multiprocess_worker.py PORT PROCESS_ID CHECKPOINT_DIR``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; prints ``ok <name>`` per optimizer.
"""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_rlx  # noqa: E402


def loss(p):
  return sum(jnp.sum(jnp.sin(2.0 * x) + 0.5 * x**2) for x in jax.tree.leaves(p))


def main(port: str, process_id: str, checkpoint_dir: str) -> None:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(0)  # the same params in both processes
  host = {"w": rng.standard_normal((64, 32)).astype(np.float32),
          "stack": rng.standard_normal((8, 16, 12)).astype(np.float32),
          "b": rng.standard_normal(32).astype(np.float32)}
  shardings = {"w": NamedSharding(mesh, P("data")), "stack": NamedSharding(mesh, P("data")),
               "b": NamedSharding(mesh, P())}
  sharded = {k: jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i])
             for k, v in host.items()}
  local = jax.tree.map(lambda v: jax.device_put(v, jax.local_devices()[0]), host)
  configs = {
      "kron": optax_rlx.kron(1e-2, key=0, stacked_layers={"w": False, "stack": True, "b": False},
                             group_multiple=8),
      "adafactor": optax_rlx.adafactor(1e-2, b1=0.9, min_dim_size_to_factor=8),
  }
  for name, tx in configs.items():
    state_sh = optax_rlx.state_sharding(tx, sharded, shardings)

    def step(p, s, tx=tx):
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, updates), s

    dist_step = jax.jit(step, in_shardings=(shardings, state_sh),
                        out_shardings=(shardings, state_sh))
    p_dist, s_dist = sharded, jax.jit(tx.init, out_shardings=state_sh)(sharded)
    p_local, s_local = local, tx.init(local)
    for _ in range(3):
      p_dist, s_dist = dist_step(p_dist, s_dist)
      p_local, s_local = jax.jit(step)(p_local, s_local)
    gathered = multihost_utils.process_allgather(p_dist, tiled=True)
    for k in host:
      np.testing.assert_allclose(np.asarray(gathered[k]), np.asarray(p_local[k]), rtol=2e-5,
                                 atol=2e-6, err_msg=f"{name} {k}")
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            s_dist, state_sh)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(f"{checkpoint_dir}/{name}", s_dist)
      ckptr.wait_until_finished()
      restored = ckptr.restore(f"{checkpoint_dir}/{name}", abstract)
    for a, b in zip(jax.tree.leaves(multihost_utils.process_allgather(s_dist, tiled=True)),
                    jax.tree.leaves(multihost_utils.process_allgather(restored, tiled=True)),
                    strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("ok", name, flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:4])
