"""Step time and state bytes of optax_rlx.kron against psgd_jax's kron and optax.adam.

(a) Optimizer only: each optimizer's jitted ``update`` on the parameter shapes of the model below,
    refitting the preconditioner every step. psgd_jax gets the same preconditioner structure as
    ours (every axis <= 8192 dense: ``max_skew_dense=inf`` on our side).
(b) Whole train step (forward + backward + optimizer) of a small transformer LM (2 layers, d=256,
    4 heads, vocab 2048, 8 x 256 = 2048 tokens per step) with each optimizer's *default*
    configuration (ours also with the cached ``P``, and with the former default: no skewed
    dense axes, cached ``P``) and refit probability 0.03. Steps are
    timed in blocks of 34 (about one refit per block) and the median block mean is reported, so
    the refits are paid for.

``geometry='quad'`` and ``geometry='triangular'`` rows are timed too. On a single CPU device
Kron loops its triangular solves over the units (jaxlib 0.10.2's batched CPU ``trsm`` deadlocked
programs with several of them; see ``optax_rlx._kron_geometry._triangular_solve``).

All timings use ``block_until_ready``; optimizers are interleaved block by block so machine noise
hits them alike. psgd_jax is optional (``pip install psgd-jax flax``); it is skipped if absent.

Usage: ``python benchmarks/kron_speed.py [--quick]``
"""

import argparse
import math
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from _baselines import import_psgd_jax_kron

import optax_rlx

VOCAB, D, LAYERS, HEADS, BATCH, SEQ = 2048, 256, 2, 4, 8, 256


def init_params(key):
  keys = iter(jax.random.split(key, 64))

  def dense(n_in, n_out):
    return jax.random.normal(next(keys), (n_in, n_out)) / math.sqrt(n_in)

  params = {
      "embed": 0.02 * jax.random.normal(next(keys), (VOCAB, D)),
      "pos": 0.02 * jax.random.normal(next(keys), (SEQ, D)),
      "ln_f": {"scale": jnp.ones(D), "bias": jnp.zeros(D)},
      "head": dense(D, VOCAB),
  }
  for i in range(LAYERS):
    params[f"block{i}"] = {
        "ln1": {"scale": jnp.ones(D), "bias": jnp.zeros(D)},
        "ln2": {"scale": jnp.ones(D), "bias": jnp.zeros(D)},
        "qkv": dense(D, 3 * D), "qkv_b": jnp.zeros(3 * D),
        "proj": dense(D, D), "proj_b": jnp.zeros(D),
        "fc": dense(D, 4 * D), "fc_b": jnp.zeros(4 * D),
        "out": dense(4 * D, D), "out_b": jnp.zeros(D),
    }
  return params


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def loss_fn(params, tokens):
  x = params["embed"][tokens[:, :-1]] + params["pos"][: SEQ - 1]
  t = x.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for i in range(LAYERS):
    p = params[f"block{i}"]
    h = _layer_norm(x, p["ln1"]) @ p["qkv"] + p["qkv_b"]
    q, k, v = jnp.split(h.reshape(BATCH, t, 3 * HEADS, D // HEADS), 3, axis=2)
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(BATCH, t, D) @ p["proj"] + p["proj_b"]
    h = jax.nn.gelu(_layer_norm(x, p["ln2"]) @ p["fc"] + p["fc_b"])
    x = x + h @ p["out"] + p["out_b"]
  logits = _layer_norm(x, params["ln_f"]) @ params["head"]
  labels = tokens[:, 1:]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def time_blocks(runners, blocks, block_steps):
  """Interleaves optimizers block by block; returns per-optimizer lists of mean ms per step."""
  times = {name: [] for name in runners}
  for _ in range(blocks):
    for name, run in runners.items():
      start = time.perf_counter()
      run(block_steps)
      times[name].append((time.perf_counter() - start) / block_steps * 1e3)
  return times


def table(title, times, baseline, states, num_params):
  """Markdown table: median ms/step, ratios to ``baseline`` and Adam, state size vs fp32 params."""
  print(f"\n### {title}\n")
  ratios = [baseline] if baseline == "optax.adam" else [baseline, "optax.adam"]
  print("| optimizer | ms/step (median) | " + " | ".join(f"vs {r}" for r in ratios)
        + " | state bytes | state / param bytes |")
  print("|---|---:|" + "---:|" * len(ratios) + "---:|---:|")
  med = {k: statistics.median(v) for k, v in times.items()}
  for name, ms in med.items():
    cells = " | ".join(f"{ms / med[r]:.2f}x" for r in ratios)
    print(f"| {name} | {ms:.2f} | {cells} | {nbytes(states[name]):,} | "
          f"{nbytes(states[name]) / (4 * num_params):.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer timed blocks")
  args = parser.parse_args()
  blocks_a, blocks_b = (5, 3) if args.quick else (15, 7)

  params = init_params(jax.random.key(0))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)
  grads = jax.grad(loss_fn)(params, tokens)
  psgd_kron = import_psgd_jax_kron()
  print(f"Model: {LAYERS} layers, d={D}, vocab {VOCAB}, {BATCH * SEQ} tokens/step, "
        f"{num_params / 1e6:.2f}M params; jax {jax.__version__}, optax {optax.__version__}, "
        f"{jax.devices()[0].platform} ({platform.machine()}); psgd_jax "
        f"{'present' if psgd_kron else 'absent'}")

  # (a) optimizer only, refit every step, same preconditioner structure.
  same = {"max_skew_dense": float("inf"), "max_size_dense": 8192, "precond_update_prob": 1.0}
  opt_a = {
      "optax_rlx.kron procrustes": optax_rlx.kron(1e-3, geometry="procrustes", key=0, **same),
      "optax.adam": optax.adam(1e-3),
  }
  opt_a["optax_rlx.kron quad"] = optax_rlx.kron(1e-3, geometry="quad", key=0, **same)
  opt_a["optax_rlx.kron triangular"] = optax_rlx.kron(1e-3, geometry="triangular", key=0, **same)
  if psgd_kron is not None:
    opt_a["psgd_jax.kron"] = psgd_kron(1e-3, preconditioner_update_probability=1.0)
  runners, states = {}, {}
  for name, tx in opt_a.items():
    update = jax.jit(tx.update)
    states[name] = tx.init(params)

    def run(n, name=name, update=update):
      for _ in range(n):
        updates, states[name] = update(grads, states[name], params)
      jax.block_until_ready((updates, states[name]))

    run(2)
    runners[name] = run
  times = time_blocks(runners, blocks_a, 4)
  table("(a) optimizer update only, refit every step (median of blocks of 4 steps)", times,
        "psgd_jax.kron" if psgd_kron else "optax.adam", states, num_params)

  # (b) whole train step, default configurations, refit probability 0.03.
  opt_b = {
      "optax_rlx.kron (default)": optax_rlx.kron(1e-3, precond_update_prob=0.03, key=0),
      "optax_rlx.kron (cache_precond=True)": optax_rlx.kron(
          1e-3, precond_update_prob=0.03, cache_precond=True, key=0
      ),
      # The defaults before 2026-12-03: no skewed axis dense, P cached.
      "optax_rlx.kron (dense_budget=0, cache_precond=True)": optax_rlx.kron(
          1e-3, precond_update_prob=0.03, dense_budget=0.0, cache_precond=True, key=0
      ),
      "optax.adam": optax.adam(1e-3),
  }
  opt_b["optax_rlx.kron (quad)"] = optax_rlx.kron(
      1e-3, precond_update_prob=0.03, geometry="quad", key=0
  )
  opt_b["optax_rlx.kron (triangular)"] = optax_rlx.kron(
      1e-3, precond_update_prob=0.03, geometry="triangular", key=0
  )
  if psgd_kron is not None:
    opt_b["psgd_jax.kron (default)"] = psgd_kron(1e-3, preconditioner_update_probability=0.03)
  runners, states = {}, {}
  for name, tx in opt_b.items():

    @jax.jit
    def train_step(params, state, tokens, tx=tx):
      loss, g = jax.value_and_grad(loss_fn)(params, tokens)
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state, loss

    carry = {"params": params, "state": tx.init(params)}
    states[name] = carry["state"]

    def run(n, carry=carry, train_step=train_step):
      for _ in range(n):
        carry["params"], carry["state"], loss = train_step(carry["params"], carry["state"], tokens)
      jax.block_until_ready(loss)

    run(2)
    runners[name] = run
  times = time_blocks(runners, blocks_b, 34)
  table("(b) train step, default configurations, refit probability 0.03 "
        "(median of blocks of 34 steps)", times, "optax.adam", states, num_params)


if __name__ == "__main__":
  main()
