"""Compile time of the optimizer update on GPT-2-shaped parameter trees (no timings of steps).

Trees: GPT-2's layout (token and position embeddings, per layer two LayerNorms, attention
``c_attn``/``c_proj`` and MLP ``c_fc``/``c_proj`` weights with biases, a final LayerNorm),
d=256, vocab 4096, context 1024, **unscanned** (one leaf per layer and weight, as Flax and
Equinox models without ``scan`` have), at 4 and 12 layers. For each optimizer the jitted
``update(grads, state, params)`` is traced and lowered (``jax.jit(...).lower``, from abstract
shapes: nothing is allocated) and then compiled by XLA (``Lowered.compile``); both are timed
separately, after ``jax.clear_caches()``, interleaved over ``--reps`` rounds, and reported as
medians with ratios to ``optax.adam``'s total on the same tree in the same run. Also reported:
the number of kernels (fusions, dots, other top-level ops) XLA emitted, which is what its CPU
compile time follows.

Usage: ``python benchmarks/kron_compile.py [--layers 4,12] [--reps 3] [--quick]``
"""

import argparse
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from _baselines import import_psgd_jax_kron

import optax_rlx

D, VOCAB, CONTEXT = 256, 4096, 1024

_KERNEL = re.compile(
    r"= \S+ (fusion|dot|reduce|sort|gather|scatter|custom-call|while|conditional)\(")


def gpt2_tree(layers: int, d: int = D, vocab: int = VOCAB, context: int = CONTEXT):
  """GPT-2's parameter tree as ``jax.ShapeDtypeStruct`` leaves (float32)."""
  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  norm = lambda: {"scale": leaf(d), "bias": leaf(d)}  # noqa: E731
  dense = lambda n_in, n_out: {"w": leaf(n_in, n_out), "b": leaf(n_out)}  # noqa: E731
  tree = {"wte": leaf(vocab, d), "wpe": leaf(context, d), "ln_f": norm()}
  for i in range(layers):
    tree[f"h{i}"] = {
        "ln_1": norm(), "ln_2": norm(),
        "attn": {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)},
        "mlp": {"c_fc": dense(d, 4 * d), "c_proj": dense(4 * d, d)},
    }
  return tree


def kernels(compiled_text: str) -> int:
  """Top-level kernels of a compiled CPU module (ops outside fused computations)."""
  count, fused = 0, False
  for line in compiled_text.splitlines():
    if line and not line.startswith(" "):
      name = line.split(" ")[0]
      fused = "fused_computation" in name or "wrapped_" in name or name.startswith("%parallel")
      continue
    if not fused and _KERNEL.search(line):
      count += 1
  return count


def compile_once(tx: optax.GradientTransformation, params) -> tuple[float, float, int]:
  """``(lower seconds, compile seconds, kernels)`` of ``jax.jit(tx.update)`` on ``params``."""
  jax.clear_caches()
  state = jax.eval_shape(tx.init, params)
  start = time.perf_counter()
  lowered = jax.jit(tx.update).lower(params, state, params)
  mid = time.perf_counter()
  compiled = lowered.compile()
  end = time.perf_counter()
  return mid - start, end - mid, kernels(compiled.as_text())


def optimizers(quick: bool) -> dict[str, optax.GradientTransformation]:
  out = {
      "optax.adam": optax.adam(1e-3),
      "optax_rlx.kron": optax_rlx.kron(1e-3, key=0),
      "optax_rlx.adafactor": optax_rlx.adafactor(1e-3),
  }
  if not quick:
    out["optax_rlx.kron (quad)"] = optax_rlx.kron(1e-3, geometry="quad", key=0)
    out["optax_rlx.kron (triangular)"] = optax_rlx.kron(1e-3, geometry="triangular", key=0)
    # Every matrix cut into 256 x 256 blocks: two factor groups on these trees, whatever the
    # depth (2026-12-05: 420 kernels against the default's 912 at 4 layers; 7.1x adam's time).
    out["optax_rlx.kron (block_size=256)"] = optax_rlx.kron(1e-3, block_size=256, key=0)
    psgd_kron = import_psgd_jax_kron()
    if psgd_kron is not None:
      out["psgd_jax.kron"] = psgd_kron(1e-3)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="4,12")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--quick", action="store_true",
                      help="one tiny tree (2 layers, d=64, vocab 512), one rep, no baselines "
                           "beyond adam")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform} "
        f"({platform.machine()})")
  configs = ([(2, 64, 512, 128)] if args.quick
             else [(int(n), D, VOCAB, CONTEXT) for n in args.layers.split(",")])
  reps = 1 if args.quick else args.reps
  for layers, d, vocab, context in configs:
    params = gpt2_tree(layers, d, vocab, context)
    txs = optimizers(args.quick)
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in txs}
    for _ in range(reps):
      for name, tx in txs.items():
        runs[name].append(compile_once(tx, params))
    leaves = len(jax.tree.leaves(params))
    print(f"\n### {layers} layers, d={d}, vocab {vocab} ({leaves} leaves), median of {reps}\n")
    print("| optimizer | lower s | compile s | total s | vs optax.adam | kernels |")
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(lo + co for lo, co, _ in runs["optax.adam"])
    for name, rows in runs.items():
      lower = statistics.median(r[0] for r in rows)
      comp = statistics.median(r[1] for r in rows)
      total = statistics.median(r[0] + r[1] for r in rows)
      print(f"| {name} | {lower:.2f} | {comp:.2f} | {total:.2f} | {total / base:.1f}x "
            f"| {rows[-1][2]} |")


if __name__ == "__main__":
  main()
