"""Orbax: N steps + save + restore into jax.eval_shape(tx.init, params) + M steps == N + M steps.

The sharded round trip (state restored into its NamedShardings on 8 devices) is in
tests/test_sharding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_rlx

ocp = pytest.importorskip("orbax.checkpoint")

PARAMS = {
    "w": jnp.linspace(-1.0, 1.0, 12 * 8).reshape(12, 8),
    "stack": jnp.linspace(0.5, -0.5, 3 * 6 * 5).reshape(3, 6, 5),
    "b": jnp.ones(8),
}


def _loss(p):
  return sum(jnp.sum(jnp.sin(3.0 * x + 0.1) ** 2) for x in jax.tree.leaves(p))


CONFIGS = {
    "adafactor": lambda: optax_rlx.adafactor(1e-2, b1=0.9, min_dim_size_to_factor=4),
    # Default refit schedule: the refit decisions depend on the stored accumulator and the
    # random probes on the stored key, so both must survive the round trip.
    "kron": lambda: optax_rlx.kron(1e-2, key=3, precond_update_prob=0.3),
    "kron-quad": lambda: optax_rlx.kron(1e-2, key=3, geometry="quad", precond_update_prob=0.3),
    "kron-stacked-newton": lambda: optax_rlx.kron(
        1e-2, key=3, criterion="newton", stacked_layers={"w": False, "stack": True, "b": False}
    ),
    "kron-in-chain-with-injected-lr": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax_rlx.kron)(learning_rate=1e-2, key=3),
    ),
}


def _steps(tx, params, state, n):
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p, obj_fn=_loss))
  for _ in range(n):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("name", CONFIGS)
def test_save_restore_resume_is_exact(name, tmp_path):
  tx = CONFIGS[name]()
  params, state = _steps(tx, PARAMS, tx.init(PARAMS), 4)

  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    ckptr.wait_until_finished()
    target = {"params": jax.eval_shape(lambda: PARAMS),
              "opt_state": jax.eval_shape(tx.init, PARAMS)}
    restored = ckptr.restore(tmp_path / "ckpt", target)

  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored["opt_state"]), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  uninterrupted = _steps(tx, params, state, 5)
  resumed = _steps(tx, restored["params"], restored["opt_state"], 5)
  for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The run really moved after the restore (a frozen state would also compare equal).
  assert not np.array_equal(np.asarray(uninterrupted[0]["w"]), np.asarray(params["w"]))
