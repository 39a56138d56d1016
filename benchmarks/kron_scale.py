"""Kron's preconditioner work per device when params and state are sharded (no timings).

On ``--devices`` simulated CPU devices (default 8; JAX is started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``), params are sharded FSDP-style (each
array's first axis divisible by the device count over ``'data'``, else its next such axis) and the
state is laid out by ``optax_rlx.state_sharding``. The jitted ``kron`` update (refit every step,
``precond_update_prob=1``) is compiled for meshes of 1, 2, 4, … devices and XLA's compiled cost
and memory analyses give, per device, as fractions of the unsharded (one-device) step:

- flops, and bytes accessed;
- argument bytes (params-shaped inputs plus the optimizer state a device holds).

Layouts: 8 separate 512x512 layers with biases (a Flax model without scan), one stacked
(8, 512, 512) leaf (``stacked_layers``), one (4096, 512) leaf cut by ``block_size=512``, and
GPT-2-small shapes (124M params, 12 separate layers, ``group_multiple=8``). Also reported: the
number of fitting units and of fitting calls (one vmapped call per factor group).

Usage: ``python benchmarks/kron_scale.py [--devices 8] [--layouts a,b] [--out FILE.md]``
"""

import argparse
import os
import sys


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--layouts", default="separate,stacked,blocked,gpt2_small")
  parser.add_argument("--out", default=None, help="also write the markdown tables to this file")
  return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={ARGS.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_rlx  # noqa: E402
from optax_rlx import _kron_options, _kron_state  # noqa: E402

F32 = jnp.float32


def _separate():
  params = {f"layer{i}": {"w": jax.ShapeDtypeStruct((512, 512), F32),
                          "b": jax.ShapeDtypeStruct((512,), F32)} for i in range(8)}
  return params, {}


def _stacked():
  return {"w": jax.ShapeDtypeStruct((8, 512, 512), F32)}, {"stacked_layers": {"w": True}}


def _blocked():
  return {"w": jax.ShapeDtypeStruct((4096, 512), F32)}, {"block_size": 512}


def _gpt2_small():
  d, vocab, ctx = 768, 50257, 1024
  s = lambda *shape: jax.ShapeDtypeStruct(shape, F32)  # noqa: E731
  params = {"wte": s(vocab, d), "wpe": s(ctx, d), "ln_f": {"g": s(d), "b": s(d)}}
  for i in range(12):
    params[f"h{i}"] = {
        "ln_1": {"g": s(d), "b": s(d)}, "ln_2": {"g": s(d), "b": s(d)},
        "attn": {"c_attn": {"w": s(d, 3 * d), "b": s(3 * d)},
                 "c_proj": {"w": s(d, d), "b": s(d)}},
        "mlp": {"c_fc": {"w": s(d, 4 * d), "b": s(4 * d)},
                "c_proj": {"w": s(4 * d, d), "b": s(d)}},
    }
  return params, {"group_multiple": 8}


LAYOUTS = {
    "separate": ("8 separate 512x512 layers + biases", _separate),
    "stacked": ("one stacked (8, 512, 512) leaf, stacked_layers", _stacked),
    "blocked": ("one (4096, 512) leaf, block_size=512", _blocked),
    "gpt2_small": ("GPT-2 small shapes (124M params), group_multiple=8", _gpt2_small),
}


def fsdp_spec(shape, n):
  """``'data'`` on the first axis divisible by ``n`` (replicated when none is)."""
  for axis, size in enumerate(shape):
    if size % n == 0 and size >= n:
      return P(*([None] * axis), "data")
  return P()


def _cost(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory = compiled.memory_analysis()
  return {"flops": cost.get("flops", 0.0), "bytes": cost.get("bytes accessed", 0.0),
          "args": memory.argument_size_in_bytes, "temp": memory.temp_size_in_bytes}


def measure(params, options, n):
  """Per-device cost of the jitted kron update on a mesh of the first ``n`` devices."""
  tx = optax_rlx.scale_by_kron(precond_update_prob=1.0, key=0, **options)
  if n == 1:
    state = jax.eval_shape(tx.init, params)
    return _cost(jax.jit(tx.update).lower(params, state, params).compile()), None
  mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
  shardings = jax.tree.map(lambda p: NamedSharding(mesh, fsdp_spec(p.shape, n)), params)
  state_sh = optax_rlx.state_sharding(tx, params, shardings)
  sharded = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                         params, shardings)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(tx.init, params), state_sh)
  step = jax.jit(tx.update, in_shardings=(shardings, state_sh, shardings),
                 out_shardings=(shardings, state_sh))
  compiled = step.lower(sharded, state, sharded).compile()
  hlo = compiled.as_text()
  comms = {op: hlo.count(f" {op}(") for op in ("all-gather", "all-to-all", "all-reduce",
                                                "collective-permute")}
  return _cost(compiled), comms


def fitting_calls(params, options):
  """(leaves, fitting units, factor groups = vmapped fitting calls per refit)."""
  layout = _kron_state.tree_layout(params, _kron_options.make_config(options))
  return len(layout.slots), sum(g.units for g in layout.groups), len(layout.groups)


def main():
  counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= jax.device_count()]
  lines = [f"# kron_scale: per-device cost of the kron update (refit every step), "
           f"{jax.device_count()} simulated CPU devices, jax {jax.__version__}", ""]
  summary = ["| layout | leaves | units | fitting calls | flops/dev | bytes/dev | args/dev |",
             "|---|---:|---:|---:|---:|---:|---:|"]
  for name in ARGS.layouts.split(","):
    title, make = LAYOUTS[name]
    params, options = make()
    base, _ = measure(params, options, 1)
    table = [f"## {title}", "",
             "| devices | flops/dev | bytes/dev | args/dev | temp/dev | all-gather | all-to-all "
             "| all-reduce |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    last = None
    for n in counts:
      cost, comms = (base, None) if n == 1 else measure(params, options, n)
      c = comms or {"all-gather": 0, "all-to-all": 0, "all-reduce": 0}
      table.append(
          f"| {n} | {cost['flops'] / base['flops']:.3f} | {cost['bytes'] / base['bytes']:.3f} "
          f"| {cost['args'] / base['args']:.3f} | {cost['temp'] / max(base['temp'], 1):.3f} "
          f"| {c['all-gather']} | {c['all-to-all']} | {c['all-reduce']} |")
      last = cost
    leaves, units, calls = fitting_calls(params, options)
    summary.append(
        f"| {title} | {leaves} | {units} | {calls} | {last['flops'] / base['flops']:.3f} "
        f"| {last['bytes'] / base['bytes']:.3f} | {last['args'] / base['args']:.3f} |")
    lines += [*table, "", f"unsharded: {base['flops'] / 1e9:.2f} GFLOP, "
                          f"{base['args'] / 2**20:.1f} MiB of arguments", ""]
    print("\n".join(table), flush=True)
  lines += [f"## Summary at {counts[-1]} devices (fractions of the one-device step)", "",
            *summary]
  print("\n".join(summary))
  if ARGS.out:
    with open(ARGS.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  sys.exit(main())
