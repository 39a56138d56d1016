"""The accelerator check: compile time, refit and non-refit step time and memory of a GPT-2 step.

On whatever device JAX finds first (GPU, TPU, or the CPU), for each optimizer, the jitted train
step (forward, backward, optimizer update, params and state donated) of a GPT-2-shaped
transformer:

- **compile s**: ``jax.jit(step).lower(...).compile()``, timed once;
- **refit ms / non-refit ms**: median wall time of a step (``block_until_ready``) while Kron
  refits its preconditioner every step, then while it never does (one compiled program: a
  ``precond_update_prob`` schedule of 1 for the first steps, then 0). Optimizers without a refit
  show the same median in both columns;
- **XLA MiB**: the step's memory by XLA's own analysis (arguments + outputs + temporaries −
  aliased), the same on every backend; **state MiB**: the optimizer state.

Model: GPT-2 small (12 layers, d=768, 12 heads, vocab 50257, context 1024: 124M params) with
**bfloat16 params** and float32 optimizer state where the optimizer offers it (``mu_dtype``,
Kron's factors; ``optax.adam``'s second moment follows the params' dtype), at batches of 8 and 32
sequences of 1024 tokens. On a CPU (no accelerator), a tiny model (2 layers, d=64, vocab 256,
64 tokens, batch 4) so the whole run takes under a minute; ``--size small`` forces GPT-2 small.
Stops starting optimizers after ``--budget`` seconds (default 420, so the run ends within 8
minutes) and lists what it skipped. Writes the table to
``benchmarks/results/gpu_check_<platform>.md`` (``--out`` to change).

Optimizers: ``optax.adam``, ``optax.adamw``, ``optax.contrib.muon`` (its defaults: Newton-Schulz
on 2-D params, Adam on the rest), ``optax_rlx.kron`` (defaults, and ``cache_precond=True``),
``optax_rlx.adafactor``, and ``psgd_jax.kron`` if installed.

Usage: ``python benchmarks/gpu_check.py [--size tiny|small] [--batches 8,32] [--out FILE]``
"""

import argparse
import math
import pathlib
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from _baselines import import_psgd_jax_kron

import optax_rlx

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
_WARMUP = 2  # untimed steps after the compile (Kron refits on them)


class Model(NamedTuple):
  layers: int
  d: int
  heads: int
  vocab: int
  seq: int


SIZES = {"small": Model(12, 768, 12, 50257, 1024), "tiny": Model(2, 64, 2, 256, 64)}


def init_params(key: jax.Array, m: Model, dtype=jnp.bfloat16) -> dict:
  keys = iter(jax.random.split(key, 8 * m.layers + 4))
  dense = lambda n_in, n_out: (jax.random.normal(next(keys), (n_in, n_out))  # noqa: E731
                               / math.sqrt(n_in)).astype(dtype)
  norm = lambda: {"scale": jnp.ones(m.d, dtype), "bias": jnp.zeros(m.d, dtype)}  # noqa: E731
  params = {"wte": (0.02 * jax.random.normal(next(keys), (m.vocab, m.d))).astype(dtype),
            "wpe": (0.01 * jax.random.normal(next(keys), (m.seq, m.d))).astype(dtype),
            "ln_f": norm()}
  for i in range(m.layers):
    params[f"h{i}"] = {"ln_1": norm(), "ln_2": norm(),
                       "c_attn": dense(m.d, 3 * m.d), "c_attn_b": jnp.zeros(3 * m.d, dtype),
                       "c_proj": dense(m.d, m.d), "c_proj_b": jnp.zeros(m.d, dtype),
                       "c_fc": dense(m.d, 4 * m.d), "c_fc_b": jnp.zeros(4 * m.d, dtype),
                       "mlp_proj": dense(4 * m.d, m.d), "mlp_proj_b": jnp.zeros(m.d, dtype)}
  return params


def _norm(x, p):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]).astype(x.dtype)


def loss_fn(params: dict, tokens: jax.Array, m: Model) -> jax.Array:
  """Next-token cross-entropy (float32) of a pre-LN causal transformer with tied embeddings."""
  batch, t = tokens.shape[0], tokens.shape[1] - 1
  x = params["wte"][tokens[:, :-1]] + params["wpe"][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for i in range(m.layers):
    p = params[f"h{i}"]
    qkv = _norm(x, p["ln_1"]) @ p["c_attn"] + p["c_attn_b"]
    q, k, v = jnp.split(qkv.reshape(batch, t, 3 * m.heads, m.d // m.heads), 3, axis=2)
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(m.d // m.heads)
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1).astype(x.dtype)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(batch, t, m.d) @ p["c_proj"]
    x = x + p["c_proj_b"]
    h = jax.nn.gelu(_norm(x, p["ln_2"]) @ p["c_fc"] + p["c_fc_b"])
    x = x + h @ p["mlp_proj"] + p["mlp_proj_b"]
  logits = (_norm(x, params["ln_f"]) @ params["wte"].T).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def optimizers(steps: int) -> dict[str, optax.GradientTransformation]:
  """Each optimizer at lr 1e-3 in its library's defaults, float32 state where it offers it;
  Kron refits on the warm-up and the first ``steps`` timed steps, and never after."""
  refit_steps = _WARMUP + steps
  refit_then_not = lambda count: jnp.where(count < refit_steps, 1.0, 0.0)  # noqa: E731
  kron = dict(mu_dtype=jnp.float32, precond_update_prob=refit_then_not, key=0)
  out = {
      "optax.adam": optax.adam(1e-3, mu_dtype=jnp.float32),
      "optax.adamw": optax.adamw(1e-3, mu_dtype=jnp.float32),
      "optax.contrib.muon": optax.contrib.muon(1e-3, mu_dtype=jnp.float32),
      "optax_rlx.kron": optax_rlx.kron(1e-3, **kron),
      "optax_rlx.kron (cache_precond)": optax_rlx.kron(1e-3, cache_precond=True, **kron),
      "optax_rlx.adafactor": optax_rlx.adafactor(1e-3),
  }
  psgd_kron = import_psgd_jax_kron()
  if psgd_kron is not None:
    out["psgd_jax.kron"] = psgd_kron(1e-3, preconditioner_update_probability=refit_then_not,
                                     mu_dtype=jnp.float32, precond_dtype=jnp.float32)
  return out


class Row(NamedTuple):
  compile_s: float
  refit_ms: float
  plain_ms: float
  xla_mib: float
  state_mib: float


def _mib(tree) -> float:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
             ) / 2**20


def measure(tx: optax.GradientTransformation, m: Model, batch: int, steps: int) -> Row:
  """Compiles and times one optimizer's train step (see the module docstring)."""
  params = init_params(jax.random.key(0), m)
  tokens = jax.random.randint(jax.random.key(1), (batch, m.seq + 1), 0, m.vocab)
  state = tx.init(params)
  state_mib = _mib(state)

  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, m)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, tokens).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  xla_mib = float("nan") if mem is None else (
      mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes) / 2**20
  times = []
  for _ in range(_WARMUP + 2 * steps + 1):
    start = time.perf_counter()
    params, state, loss = compiled(params, state, tokens)
    jax.block_until_ready(loss)
    times.append((time.perf_counter() - start) * 1e3)
  refit = times[_WARMUP:_WARMUP + steps]  # Kron refits on these (and the warm-up steps)
  plain = times[_WARMUP + steps + 1:]  # ... and not on these (one more step of warm-up)
  return Row(compile_s, statistics.median(refit), statistics.median(plain), xla_mib, state_mib)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  on_cpu = jax.devices()[0].platform == "cpu"
  parser.add_argument("--size", choices=sorted(SIZES), default="tiny" if on_cpu else "small")
  parser.add_argument("--batches", default="4" if on_cpu else "8,32")
  parser.add_argument("--steps", type=int, default=3 if on_cpu else 10,
                      help="timed steps per phase (refit, then non-refit), after warm-up steps")
  parser.add_argument("--budget", type=float, default=420.0,
                      help="seconds after which no further optimizer is started")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  m, device = SIZES[args.size], jax.devices()[0]
  started = time.perf_counter()
  num_params = sum(x.size for x in jax.tree.leaves(
      jax.eval_shape(lambda: init_params(jax.random.key(0), m))))
  lines = [f"# GPU check: {device.device_kind} ({device.platform}), jax {jax.__version__}",
           "",
           f"Model {args.size}: {m.layers} layers, d={m.d}, vocab {m.vocab}, {m.seq} tokens, "
           f"{num_params / 1e6:.1f}M bfloat16 params. Medians over {args.steps} steps "
           "per phase.", ""]
  skipped = []
  for batch in [int(b) for b in args.batches.split(",")]:
    lines += [f"## batch {batch} x {m.seq} tokens", "",
              "| optimizer | compile s | refit ms | non-refit ms | vs adam (non-refit) "
              "| XLA MiB | state MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    rows = {}
    for name, tx in optimizers(args.steps).items():
      if time.perf_counter() - started > args.budget:
        skipped.append(f"{name} (batch {batch})")
        continue
      rows[name] = r = measure(tx, m, batch, args.steps)
      base = rows.get("optax.adam", r).plain_ms
      lines.append(f"| {name} | {r.compile_s:.1f} | {r.refit_ms:.2f} | {r.plain_ms:.2f} | "
                   f"{r.plain_ms / base:.2f}x | {r.xla_mib:.0f} | {r.state_mib:.1f} |")
      print(lines[-1], flush=True)
    lines.append("")
  if skipped:
    lines.append(f"Skipped (over the {args.budget:.0f} s budget): {', '.join(skipped)}.")
  lines.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
  text = "\n".join(lines) + "\n"
  print(text)
  out = pathlib.Path(args.out) if args.out else RESULTS / f"gpu_check_{device.platform}.md"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(f"Wrote {out}")


if __name__ == "__main__":
  main()
