"""Jitted update time and optimizer-state bytes of Adafactor on GPT-2-small shapes.

Compares ``optax_rlx.adafactor`` against ``optax.adafactor`` in the configuration where the two are
bit-identical (constant learning rate, parameter scaling, clipping at 1, β̂₂ = 1 - t^-0.8,
``min_dim_size_to_factor=128``), the paper's default (relative step), and ``optax.adam``.

Each optimizer's ``update`` is jitted alone (no model), fed fixed random gradients, warmed up, then
timed ``--steps`` times with ``block_until_ready``; the optimizers are interleaved step by step so
machine noise hits them alike. Prints a Markdown table of medians and ratios.

Usage: ``python benchmarks/adafactor_speed.py [--steps 25] [--layers 12]``
"""

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import optax_rlx


def gpt2_small_params(layers: int, vocab: int = 50257, ctx: int = 1024, d: int = 768):
  """GPT-2-small parameter shapes (124M parameters at 12 layers), float32, random values."""
  shapes = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f_g": (d,), "ln_f_b": (d,)}
  for i in range(layers):
    shapes |= {
        f"h{i}_ln1_g": (d,), f"h{i}_ln1_b": (d,), f"h{i}_ln2_g": (d,), f"h{i}_ln2_b": (d,),
        f"h{i}_attn_w": (d, 3 * d), f"h{i}_attn_b": (3 * d,),
        f"h{i}_proj_w": (d, d), f"h{i}_proj_b": (d,),
        f"h{i}_fc_w": (d, 4 * d), f"h{i}_fc_b": (4 * d,),
        f"h{i}_out_w": (4 * d, d), f"h{i}_out_b": (d,),
    }
  keys = jax.random.split(jax.random.key(0), len(shapes))
  return {
      name: 0.02 * jax.random.normal(k, shape, jnp.float32)
      for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
  }


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=25, help="timed steps per optimizer (>= 20)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--layers", type=int, default=12, help="blocks (12 = GPT-2 small)")
  args = parser.parse_args()

  params = gpt2_small_params(args.layers)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  grads = jax.tree.map(lambda p, k: jax.random.normal(k, p.shape, p.dtype) * 1e-3, params,
                       dict(zip(params, jax.random.split(jax.random.key(1), len(params)),
                                strict=True)))
  optimizers = {
      "optax.adafactor(1e-2)": optax.adafactor(1e-2),
      "optax_rlx.adafactor(1e-2)": optax_rlx.adafactor(1e-2),
      "optax_rlx.adafactor() [paper]": optax_rlx.adafactor(),
      "optax.adam(1e-3)": optax.adam(1e-3),
  }
  steps, states, times = {}, {}, {name: [] for name in optimizers}
  for name, tx in optimizers.items():
    steps[name] = jax.jit(tx.update)
    states[name] = tx.init(params)
    for _ in range(args.warmup):
      updates, states[name] = steps[name](grads, states[name], params)
      jax.block_until_ready((updates, states[name]))
  for _ in range(args.steps):
    for name in optimizers:
      start = time.perf_counter()
      updates, states[name] = steps[name](grads, states[name], params)
      jax.block_until_ready((updates, states[name]))
      times[name].append(time.perf_counter() - start)

  median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
  base, adam = median["optax.adafactor(1e-2)"], median["optax.adam(1e-3)"]
  print(f"GPT-2-small shapes: {args.layers} layers, {num_params / 1e6:.1f}M fp32 params; "
        f"median of {args.steps} jitted updates after {args.warmup} warm-up; "
        f"jax {jax.__version__}, "
        f"optax {optax.__version__}, {jax.devices()[0].platform}, {platform.machine()}, "
        f"{jax.local_device_count()} device(s)\n")
  print("| optimizer | update ms (median) | vs optax.adafactor | vs adam | state bytes | "
        "bytes/param |")
  print("|---|---:|---:|---:|---:|---:|")
  for name in optimizers:
    state_bytes = nbytes(states[name])
    print(f"| {name} | {median[name]:.1f} | {median[name] / base:.2f}x | "
          f"{median[name] / adam:.2f}x | {state_bytes:,} | {state_bytes / num_params:.4f} |")


if __name__ == "__main__":
  main()
