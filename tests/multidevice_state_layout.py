"""state_sharding on a (2, 4) mesh: the documented layout rules, sharded init and steps that keep
their layout and match the unsharded ones, no gathered parameter in the HLO, stacked layers, a
(8,) data mesh, and a sharded Orbax round trip.

Run by ``tests/test_sharding.py`` in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``:
``python tests/multidevice_state_layout.py Auto|Explicit``.
"""

import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_rlx
from optax_rlx import _kron_options, _kron_state


def main(axis_type: str) -> None:
  kind = getattr(AxisType, axis_type)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
  jax.set_mesh(mesh)
  params = {
      "w": jnp.arange(64 * 16.0).reshape(64, 16) / 1e3,
      "big": jnp.arange(136 * 128.0).reshape(136, 128) / 1e4,
      "stack": jnp.arange(4 * 8 * 12.0).reshape(4, 8, 12) / 1e3,  # 4 layers of (8, 12)
      "b": jnp.ones(16),
  }
  specs = {"w": P("data", "model"), "big": P("data", "model"),
           "stack": P("data", None, "model"), "b": P("model")}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  sharded = jax.device_put(params, shardings)

  def loss(p):
    return sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree.leaves(p))

  stacked = {"w": False, "big": False, "stack": True, "b": False}
  configs = {
      "adafactor": optax_rlx.adafactor(1e-2, b1=0.9, min_dim_size_to_factor=4),
      # big (136, 128) is cut into 4 x 2 blocks of (34, 64) by block_size=64.
      # Refits every other step: both branches of the refit run (the cached P's layout is
      # GROUP_SCRIPT's subject).
      "kron": optax_rlx.kron(1e-3, key=0, precond_update_prob=0.5, stacked_layers=stacked,
                             block_size=64),
      "kron-dense": optax_rlx.kron(1e-3, key=0, precond_update_prob=1.0,
                                   max_skew_dense=float("inf"), stacked_layers=stacked),
  }
  def spec(tree):
    return jax.tree.map(lambda s: tuple(s.spec), tree)

  # The documented rules, spelled out for adafactor and kron.
  ada = optax_rlx.state_sharding(configs["adafactor"], params, shardings)
  # 'largest_two' on (64, 16): rows run along axis 1 (16), columns along axis 0 (64).
  assert ada[0].v_row["w"].spec == P(None, "model"), ada[0].v_row["w"]  # (1, 16)
  assert ada[0].v_col["w"].spec == P("data", None), ada[0].v_col["w"]  # (64, 1)
  assert ada[0].v_row["stack"].spec == P("data", None, None)  # (4, 8, 1): row axis 1 unsharded
  assert ada[0].v_col["stack"].spec == P("data", None, "model")  # (4, 1, 12)
  assert ada[0].v["b"].spec == P("model") and ada[0].v["w"].spec == P()  # placeholder
  assert ada[0].count.spec == P() and ada[1].mu["big"].spec == P("data", "model")
  names = sorted(params)  # the leaves' order

  def group(groups, key, **options):
    """The arrays (here shardings) of the factor group holding leaf ``key``'s units."""
    layout = _kron_state.tree_layout(params, _kron_options.make_config(options))
    return groups[layout.groups[layout.slots[names.index(key)].group].name]

  structure = {"stacked_layers": stacked, "block_size": 64}
  kr = optax_rlx.state_sharding(configs["kron"], params, shardings)[0]
  # big's 8 blocks of (34, 64) form one group of 8: sharded over both axes (2 x 4 divides 8).
  both = P(("data", "model"), None, None)
  assert [q.spec for q in group(kr.Qs, "big", **structure)] == [both] * 2, spec(kr.Qs)
  # w and b are groups of one: replicated. stack's 4 layers: 'data' (2) divides 4, 2 x 4 not.
  assert all(q.spec == P() for k in ("w", "b") for q in group(kr.Qs, k, **structure)), spec(kr.Qs)
  assert [q.spec for q in group(kr.Qs, "stack", **structure)] == [P("data", None, None)] * 2
  assert [x.spec for x in group(kr.Ls, "stack", **structure)] == [P("data")] * 2
  assert kr.Ps == ()  # no cache by default
  by_model = optax_rlx.kron(1e-3, stacked_layers=stacked, block_size=64, group_axes="model")
  only_model = optax_rlx.state_sharding(by_model, params, shardings)
  assert [q.spec for q in group(only_model[0].Qs, "stack", **structure)] == [
      P("model", None, None)] * 2
  try:
    optax_rlx.state_sharding(optax_rlx.kron(1e-3, group_axes="pipe"), params, shardings)
    raise AssertionError("an unknown group axis must raise")
  except ValueError as e:
    assert "group_axes" in str(e) and "pipe" in str(e), e
  kr = optax_rlx.state_sharding(configs["kron-dense"], params, shardings)[0]
  dense = {"stacked_layers": stacked, "max_skew_dense": float("inf")}
  assert all(q.spec == P() for k in ("w", "big", "b") for q in group(kr.Qs, k, **dense)), spec(
      kr.Qs)
  assert [q.spec for q in group(kr.Qs, "stack", **dense)] == [P("data", None, None)] * 2
  assert kr.mu["w"].spec == P("data", "model") and kr.key.spec == P()

  for name, tx in configs.items():
    state_sh = optax_rlx.state_sharding(tx, params, shardings)
    state = jax.jit(tx.init, out_shardings=state_sh)(sharded)
    if kind == AxisType.Explicit:  # explicit types: a plain jitted init lays the state out too
      plain_init = jax.jit(tx.init)(sharded)
      for a, s in zip(jax.tree.leaves(plain_init), jax.tree.leaves(state_sh), strict=True):
        assert a.sharding.is_equivalent_to(s, a.ndim), (name, a.sharding, s)
    step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p),
                   in_shardings=(shardings, state_sh, shardings),
                   out_shardings=(shardings, state_sh))
    grad_fn = jax.jit(jax.grad(loss))
    grads = grad_fn(sharded)
    # No full parameter is all-gathered (Adafactor gathers nothing at all). Not checked for
    # kron-dense: there a dense factor is larger than its param (n² > numel), and gathering
    # the param along the sharded axis moves fewer bytes than the (n, n) statistics, which
    # XLA may rightly prefer.
    compiled = step.lower(grads, state, sharded).compile()  # inspected here, run below
    gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", compiled.as_text())
    shapes = [tuple(sorted(int(d) for d in g.split(",") if d)) for g in gathered]
    if name == "adafactor":
      assert not shapes, shapes
    for key, p in params.items():
      if p.ndim >= 2 and name != "kron-dense":
        assert tuple(sorted(p.shape)) not in shapes, (name, key, shapes)
    plain, plain_step = jax.jit(tx.init)(params), jax.jit(tx.update)
    for _ in range(3):
      u_plain, plain = plain_step(grad_fn(params), plain, params)
      u_dist, state = compiled(grad_fn(sharded), state, sharded)
      for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_dist), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6,
                                   err_msg=name)
    for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh), strict=True):
      assert a.sharding.is_equivalent_to(s, a.ndim), (name, a.sharding, s)

    # Orbax: the sharded state restores into its abstract, sharded layout, bit for bit.
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    with tempfile.TemporaryDirectory() as tmp, ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp + "/state", state)
      ckptr.wait_until_finished()
      restored = ckptr.restore(tmp + "/state", abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert b.sharding.is_equivalent_to(a.sharding, a.ndim), (name, a.sharding, b.sharding)
    print("ok", name)

  # Pure data parallelism on an (8,) mesh: every matrix sharded along its first axis.
  mesh8 = jax.make_mesh((8,), ("data",), axis_types=(kind,))
  with jax.set_mesh(mesh8):
    specs8 = {"w": P("data"), "big": P("data"), "stack": P(None, "data"), "b": P()}
    sh8 = {k: NamedSharding(mesh8, s) for k, s in specs8.items()}
    host = jax.tree.map(np.asarray, params)  # arrays made under the (2, 4) mesh stay there
    local = jax.tree.map(jnp.asarray, host)
    sharded8 = jax.device_put(host, sh8)
    for name in ("adafactor", "kron"):
      tx = configs[name]
      state_sh = optax_rlx.state_sharding(tx, local, sh8)
      state = jax.jit(tx.init, out_shardings=state_sh)(sharded8)
      step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p),
                     in_shardings=(sh8, state_sh, sh8), out_shardings=(sh8, state_sh))
      plain, plain_step = jax.jit(tx.init)(local), jax.jit(tx.update)
      grad_fn = jax.jit(jax.grad(loss))
      for _ in range(2):
        u_plain, plain = plain_step(grad_fn(local), plain, local)
        u_dist, state = step(grad_fn(sharded8), state, sharded8)
        for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_dist), strict=True):
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6,
                                     err_msg=name + " (8,)")
      print("ok", name, "(8,) data mesh")


if __name__ == "__main__":
  main(sys.argv[1])
