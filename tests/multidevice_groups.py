"""Kron's factor groups sharded over an (8,) 'data' mesh (FSDP-style params): every device stores
and refits 1/8 of each group (flops per device <= 0.25 of one device's), no whole group is
gathered, and the step matches the unsharded one.

Run by ``tests/test_sharding.py`` in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``:
``python tests/multidevice_groups.py``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_rlx


def main() -> None:
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
  layouts = {
      "separate": ({f"l{i}": {"w": normal(64, 32), "b": normal(32)} for i in range(8)}, {}),
      "stacked": ({"w": normal(8, 64, 32)}, {"stacked_layers": {"w": True}}),
      "blocked": ({"w": normal(512, 32)}, {"block_size": 64}),
  }

  def loss(p):
    return sum(jnp.sum(jnp.sin(2.0 * x) + 0.5 * x ** 2) for x in jax.tree.leaves(p))

  def flops(compiled):
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  # "cached": refits every other step with P cached (both branches of the refit compiled).
  configs = {"procrustes": {}, "triangular": {"geometry": "triangular"},
             "quad": {"geometry": "quad"},
             "newton": {"criterion": "newton"},
             "cached": {"precond_update_prob": 0.5, "cache_precond": True}}
  for layout, (params, structure) in layouts.items():
    shardings = jax.tree.map(lambda p: NamedSharding(mesh, P("data")), params)
    sharded = jax.device_put(params, shardings)
    for name, options in configs.items():
      if name in ("newton", "cached", "quad") and layout != "separate":  # one layout (CI time)
        continue
      tx = optax_rlx.kron(1e-2, key=0, **{"precond_update_prob": 1.0, **structure, **options})
      state_sh = optax_rlx.state_sharding(tx, params, shardings)
      assert (state_sh[0].Ps != ()) == (name == "cached"), (name, state_sh[0].Ps)
      groups = [*state_sh[0].Qs.values(), *(state_sh[0].Ps.values() if state_sh[0].Ps else ())]
      for group in groups:  # every group (of 8 units) sharded along its axis
        assert all(s.spec[0] == "data" for s in group), (layout, state_sh[0].Qs)
      update = lambda g, s, p, tx=tx: tx.update(g, s, p, obj_fn=loss)  # noqa: E731
      plain_step = jax.jit(update)  # one device, no mesh
      plain_grad, plain = jax.jit(jax.grad(loss)), jax.jit(tx.init)(params)
      # Each step is compiled once, and the executable both inspected and run.
      unsharded = plain_step.lower(plain_grad(params), plain, params).compile()
      u_plain = []
      for _ in range(3):
        u, plain = unsharded(plain_grad(params), plain, params)
        u_plain.append(u)
      with jax.set_mesh(mesh):  # as users run it; the layout comes from the shardings
        state = jax.jit(tx.init, out_shardings=state_sh)(sharded)
        step = jax.jit(update, in_shardings=(shardings, state_sh, shardings),
                       out_shardings=(shardings, state_sh))
        grad_fn = jax.jit(jax.grad(loss))
        compiled = step.lower(grad_fn(sharded), state, sharded).compile()
        u_dist = []
        for _ in range(3):
          u, state = compiled(grad_fn(sharded), state, sharded)
          u_dist.append(u)
      # No whole factor group is gathered onto every device.
      group_shapes = {tuple(q.shape) for q in jax.tree.leaves((state[0].Qs, state[0].Ps))
                      if q.ndim == 3}
      gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", compiled.as_text())
      shapes = {tuple(int(d) for d in g.split(",") if d) for g in gathered}
      assert not shapes & group_shapes, (layout, name, shapes, group_shapes)
      ratio = flops(compiled) / flops(unsharded)
      assert ratio <= 0.25, (layout, name, ratio)
      for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_dist), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6,
                                   err_msg=f"{layout} {name}")
      for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh), strict=True):
        assert a.sharding.is_equivalent_to(s, a.ndim), (layout, name, a.sharding, s)
      print("ok", layout, name, f"flops/device {ratio:.3f}", sorted(shapes))


if __name__ == "__main__":
  main()
