"""Sharded params on 8 simulated CPU devices give the unsharded results (Auto and Explicit meshes).

JAX fixes the device count when its backend starts, so the check runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import xla_test_flags

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


def _run_on_8_devices(script, axis_type):
  """Runs ``script`` in a fresh Python with 8 simulated CPU devices; returns its stdout."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  xla_test_flags.apply(env)  # the session's other flags too
  result = subprocess.run(
      [sys.executable, "-c", script, axis_type], env=env, capture_output=True, text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_params_give_unsharded_results(axis_type):
  stdout = _run_on_8_devices(SCRIPT, axis_type)
  assert stdout.count("ok ") == 2, stdout


# state_sharding, sharded init/steps that keep their layout, the HLO, stacked layers and a sharded
# Orbax round trip, on a (2, 4) ('data', 'model') mesh.
SCALE_SCRIPT = textwrap.dedent(
    """
    import re, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np, optax
    import orbax.checkpoint as ocp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import optax_rlx

    kind = getattr(AxisType, sys.argv[1])
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
    spec = lambda tree: jax.tree.map(lambda s: tuple(s.spec), tree)

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
    group = lambda fg, key: fg.groups[fg.layout.slots[names.index(key)].group]  # noqa: E731
    kr = optax_rlx.state_sharding(configs["kron"], params, shardings)[0]
    # big's 8 blocks of (34, 64) form one group of 8: sharded over both axes (2 x 4 divides 8).
    both = P(("data", "model"), None, None)
    assert [q.spec for q in group(kr.Qs, "big")] == [both] * 2, spec(kr.Qs)
    # w and b are groups of one: replicated. stack's 4 layers: 'data' (2) divides 4, 2 x 4 not.
    assert all(q.spec == P() for k in ("w", "b") for q in group(kr.Qs, k)), spec(kr.Qs)
    assert [q.spec for q in group(kr.Qs, "stack")] == [P("data", None, None)] * 2
    assert [l.spec for l in group(kr.Ls, "stack")] == [P("data")] * 2
    assert kr.Ps == ()  # no cache by default
    by_model = optax_rlx.kron(1e-3, stacked_layers=stacked, block_size=64, group_axes="model")
    only_model = optax_rlx.state_sharding(by_model, params, shardings)
    assert [q.spec for q in group(only_model[0].Qs, "stack")] == [P("model", None, None)] * 2
    try:
      optax_rlx.state_sharding(optax_rlx.kron(1e-3, group_axes="pipe"), params, shardings)
      raise AssertionError("an unknown group axis must raise")
    except ValueError as e:
      assert "group_axes" in str(e) and "pipe" in str(e), e
    kr = optax_rlx.state_sharding(configs["kron-dense"], params, shardings)[0]
    assert all(q.spec == P() for k in ("w", "big", "b") for q in group(kr.Qs, k)), spec(kr.Qs)
    assert [q.spec for q in group(kr.Qs, "stack")] == [P("data", None, None)] * 2, spec(kr.Qs)
    assert kr.mu["w"].spec == P("data", "model") and kr.key.spec == P()

    for name, tx in configs.items():
      state_sh = optax_rlx.state_sharding(tx, params, shardings)
      state = jax.jit(tx.init, out_shardings=state_sh)(sharded)
      if kind == AxisType.Explicit:  # explicit types: a plain jitted init lays the state out too
        plain_init = jax.jit(tx.init)(sharded)
        for a, s in zip(jax.tree.leaves(plain_init), jax.tree.leaves(state_sh)):
          assert a.sharding.is_equivalent_to(s, a.ndim), (name, a.sharding, s)
      step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p),
                     in_shardings=(shardings, state_sh, shardings),
                     out_shardings=(shardings, state_sh))
      grads = jax.jit(jax.grad(loss))(sharded)
      # No full parameter is all-gathered (Adafactor gathers nothing at all). Not checked for
      # kron-dense: there a dense factor is larger than its param (n² > numel), and gathering
      # the param along the sharded axis moves fewer bytes than the (n, n) statistics, which
      # XLA may rightly prefer.
      gathered = re.findall(r"= \\w+\\[([\\d,]*)\\]\\S* all-gather\\(",
                            step.lower(grads, state, sharded).compile().as_text())
      shapes = [tuple(sorted(int(d) for d in g.split(",") if d)) for g in gathered]
      if name == "adafactor":
        assert not shapes, shapes
      for key, p in params.items():
        if p.ndim >= 2 and name != "kron-dense":
          assert tuple(sorted(p.shape)) not in shapes, (name, key, shapes)
      plain = tx.init(params)
      for _ in range(3):
        u_plain, plain = jax.jit(tx.update)(jax.grad(loss)(params), plain, params)
        grads = jax.jit(jax.grad(loss))(sharded)
        u_dist, state = step(grads, state, sharded)
        for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_dist)):
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6,
                                     err_msg=name)
      for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
        assert a.sharding.is_equivalent_to(s, a.ndim), (name, a.sharding, s)

      # Orbax: the sharded state restores into its abstract, sharded layout, bit for bit.
      abstract = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
      with tempfile.TemporaryDirectory() as tmp:
        with ocp.StandardCheckpointer() as ckptr:
          ckptr.save(tmp + "/state", state)
          ckptr.wait_until_finished()
          restored = ckptr.restore(tmp + "/state", abstract)
      assert jax.tree.structure(restored) == jax.tree.structure(state)
      for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
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
        plain = tx.init(local)
        for _ in range(2):
          u_plain, plain = jax.jit(tx.update)(jax.grad(loss)(local), plain, local)
          u_dist, state = step(jax.jit(jax.grad(loss))(sharded8), state, sharded8)
          for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_dist)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6,
                                       err_msg=name + " (8,)")
        print("ok", name, "(8,) data mesh")
    """
)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_state_sharding_layout_hlo_and_checkpoint(axis_type):
  stdout = _run_on_8_devices(SCALE_SCRIPT, axis_type)
  assert stdout.count("ok ") == 5, stdout


# Factor groups sharded over an (8,) 'data' mesh (FSDP-style params): every device stores and
# refits 1/8 of each group, and the step matches the unsharded one.
GROUP_SCRIPT = textwrap.dedent(
    """
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import optax_rlx

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
               "newton": {"criterion": "newton"},
               "cached": {"precond_update_prob": 0.5, "cache_precond": True}}
    for layout, (params, structure) in layouts.items():
      shardings = jax.tree.map(lambda p: NamedSharding(mesh, P("data")), params)
      sharded = jax.device_put(params, shardings)
      for name, options in configs.items():
        if name in ("newton", "cached") and layout != "separate":  # one layout (CI time)
          continue
        tx = optax_rlx.kron(1e-2, key=0, **{"precond_update_prob": 1.0, **structure, **options})
        state_sh = optax_rlx.state_sharding(tx, params, shardings)
        assert (state_sh[0].Ps != ()) == (name == "cached"), (name, state_sh[0].Ps)
        groups = state_sh[0].Qs.groups + (state_sh[0].Ps.groups if state_sh[0].Ps else ())
        for group in groups:  # every group (of 8 units) sharded along its axis
          assert all(s.spec[0] == "data" for s in group), (layout, state_sh[0].Qs)
        update = lambda g, s, p, tx=tx: tx.update(g, s, p, obj_fn=loss)  # noqa: E731
        plain_step = jax.jit(update)  # one device, no mesh
        grads_plain = jax.grad(loss)(params)
        unsharded = plain_step.lower(grads_plain, tx.init(params), params).compile()
        plain = tx.init(params)
        u_plain = []
        for _ in range(3):
          u, plain = plain_step(jax.grad(loss)(params), plain, params)
          u_plain.append(u)
        with jax.set_mesh(mesh):  # as users run it; the layout comes from the shardings
          state = jax.jit(tx.init, out_shardings=state_sh)(sharded)
          step = jax.jit(update, in_shardings=(shardings, state_sh, shardings),
                         out_shardings=(shardings, state_sh))
          grads = jax.jit(jax.grad(loss))(sharded)
          compiled = step.lower(grads, state, sharded).compile()
          u_dist = []
          for _ in range(3):
            u, state = step(jax.jit(jax.grad(loss))(sharded), state, sharded)
            u_dist.append(u)
        # No whole factor group is gathered onto every device.
        group_shapes = {tuple(q.shape) for q in jax.tree.leaves((state[0].Qs, state[0].Ps))
                        if q.ndim == 3}
        gathered = re.findall(r"= \\w+\\[([\\d,]*)\\]\\S* all-gather\\(", compiled.as_text())
        shapes = {tuple(int(d) for d in g.split(",") if d) for g in gathered}
        assert not shapes & group_shapes, (layout, name, shapes, group_shapes)
        ratio = flops(compiled) / flops(unsharded)
        assert ratio <= 0.25, (layout, name, ratio)
        for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_dist)):
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6,
                                     err_msg=f"{layout} {name}")
        for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
          assert a.sharding.is_equivalent_to(s, a.ndim), (layout, name, a.sharding, s)
        print("ok", layout, name, f"flops/device {ratio:.3f}", sorted(shapes))
    """
)


def test_factor_groups_are_sharded_and_match_the_unsharded_step():
  stdout = _run_on_8_devices(GROUP_SCRIPT, "Auto")
  assert stdout.count("ok ") == 8, stdout
