"""The training problems of ``compare.py``: self-contained, data generated or from scikit-learn.

A problem is a :class:`Problem`: ``init(key) -> params``, ``batch(key) -> batch`` (sampled inside
the jitted training loop), ``loss(params, batch) -> scalar``, and ``evaluate(params) -> metric``
(or ``None``). ``target`` is the training-loss level for "steps to target"; ``smooth`` is the
running-mean window applied to the loss curve before it is compared with the target (1 for
deterministic problems).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
  name: str
  description: str
  init: Callable[[jax.Array], Any]
  batch: Callable[[jax.Array], Any]
  loss: Callable[[Any, Any], jax.Array]
  evaluate: Callable[[Any], jax.Array] | None
  metric_name: str | None
  target: float
  smooth: int
  steps: int
  quick_steps: int
  lrs: tuple[float, ...]
  warmup: int = 0
  # Evaluate the metric every ``eval_every`` steps inside the loop (0: only at the end); the
  # curve is reported against steps and wall-clock.
  eval_every: int = 0
  # Pick the best lr by the lowest final metric (e.g. validation loss) instead of the training
  # loss; ``target`` is then a level of the metric.
  select_by_metric: bool = False
  # Run only these optimizers on this problem (None: all of the run's optimizers).
  optimizers: tuple[str, ...] | None = None
  seeds: int | None = None  # seeds per lr in full mode (None: the run's default)
  quick_lrs: tuple[float, ...] | None = None  # the lr grid in quick mode (None: ``lrs``)
  quick_optimizers: tuple[str, ...] | None = None  # its list in quick mode (None: ``optimizers``)
  in_quick: bool = True  # run in quick mode (False: only in full mode, or when named)


def _rotated(rng, n, cond):
  """A matrix M = U diag(s) Vᵀ with random rotations and M Mᵀ of condition number ``cond``."""
  u, _ = np.linalg.qr(rng.standard_normal((n, n)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  s = np.logspace(0, math.log10(cond) / 2, n)
  return u @ np.diag(s) @ v.T


# -------------------------------------------------------------------------------------------
# Ill-conditioned matrix least squares: min ½ mean ‖X W − Y‖², cond(XᵀX) = 1e4, rotated features.
# -------------------------------------------------------------------------------------------


def least_squares() -> Problem:
  rng = np.random.default_rng(0)
  n_in, n_out, n = 32, 16, 512
  x = rng.standard_normal((n, n_in)) @ _rotated(rng, n_in, 1e4)
  x /= np.sqrt(np.mean(x**2))
  w_true = rng.standard_normal((n_in, n_out))
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(x @ w_true, jnp.float32)
  baseline = float(0.5 * jnp.mean(jnp.sum(y**2, axis=1)))

  def loss(w, batch):
    del batch
    return 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, axis=1)) / baseline

  return Problem(
      name="least_squares",
      description="min ½‖XW − Y‖² / ½‖Y‖², W 32×16, 512 rotated samples, cond(XᵀX) = 1e4 "
      "(full batch, noiseless: optimum 0)",
      init=lambda key: jnp.zeros((n_in, n_out)),
      batch=lambda key: (),
      loss=loss,
      evaluate=None,
      metric_name=None,
      target=1e-4,
      smooth=1,
      steps=2000,
      quick_steps=500,
      lrs=(3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
  )


# -------------------------------------------------------------------------------------------
# Rosenbrock: the 2-D banana from (−1.2, 1), and a batch of 64 independent ones.
# -------------------------------------------------------------------------------------------


def _rosenbrock(p):
  return (1.0 - p[..., 0]) ** 2 + 100.0 * (p[..., 1] - p[..., 0] ** 2) ** 2


def rosenbrock() -> Problem:
  return Problem(
      name="rosenbrock",
      description="f(x, y) = (1 − x)² + 100 (y − x²)² from (−1.2, 1); optimum 0 at (1, 1)",
      init=lambda key: jnp.array([-1.2, 1.0]),
      batch=lambda key: (),
      loss=lambda p, batch: _rosenbrock(p),
      evaluate=lambda p: jnp.linalg.norm(p - 1.0),
      metric_name="‖p − (1,1)‖",
      target=1e-6,
      smooth=1,
      steps=2000,
      quick_steps=1000,
      lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
  )


def rosenbrock_batched() -> Problem:
  def init(key):
    # 64 starting points spread over [-2, 2] × [-1, 3]: params of shape (64, 2).
    return jax.random.uniform(key, (64, 2), minval=jnp.array([-2.0, -1.0]),
                              maxval=jnp.array([2.0, 3.0]))

  return Problem(
      name="rosenbrock_batched",
      description="mean of 64 independent 2-D Rosenbrocks, params (64, 2), random starts",
      init=init,
      batch=lambda key: (),
      loss=lambda p, batch: jnp.mean(_rosenbrock(p)),
      evaluate=lambda p: jnp.max(jnp.linalg.norm(p - 1.0, axis=-1)),
      metric_name="max ‖p − (1,1)‖",
      target=1e-6,
      smooth=1,
      steps=3000,
      quick_steps=1000,
      lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
  )


# -------------------------------------------------------------------------------------------
# MLP on scikit-learn's digits (8×8 images, 10 classes), 30% held out.
# -------------------------------------------------------------------------------------------


def digits_mlp() -> Problem:
  from sklearn.datasets import load_digits  # shipped with scikit-learn: no download

  data = load_digits()
  x = np.asarray(data.data, np.float32) / 16.0
  y = np.asarray(data.target, np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  n_train = int(0.7 * len(x))
  x_train, y_train = jnp.asarray(x[perm[:n_train]]), jnp.asarray(y[perm[:n_train]])
  x_test, y_test = jnp.asarray(x[perm[n_train:]]), jnp.asarray(y[perm[n_train:]])
  sizes = (64, 128, 128, 10)

  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) * math.sqrt(2.0 / a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

  def logits(params, x):
    for layer in params[:-1]:
      x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]

  def batch(key):
    idx = jax.random.randint(key, (128,), 0, n_train)
    return x_train[idx], y_train[idx]

  def loss(params, batch):
    x, y = batch
    logp = jax.nn.log_softmax(logits(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

  def evaluate(params):
    return jnp.mean(jnp.argmax(logits(params, x_test), axis=1) == y_test)

  return Problem(
      name="digits_mlp",
      description=f"MLP 64-128-128-10 (ReLU) on sklearn digits, batch 128, "
      f"{n_train} train / {len(x) - n_train} test",
      init=init,
      batch=batch,
      loss=loss,
      evaluate=evaluate,
      metric_name="test accuracy",
      target=0.02,
      smooth=50,
      # Every optimizer that reaches the target did so by step ~310 in the 1500-step full run of
      # 2026-12-02; 800 steps keep that visible at half the time.
      steps=800,
      quick_steps=400,
      lrs=(3e-4, 1e-3, 3e-3, 1e-2),
  )


# -------------------------------------------------------------------------------------------
# A small transformer on a synthetic sequence task: sort 10 tokens.
# -------------------------------------------------------------------------------------------

_SORT_LEN, _SORT_VOCAB = 10, 16  # tokens 0..15, separator 16
_T_D, _T_HEADS, _T_LAYERS = 64, 4, 2


def _sort_batch(key, batch_size):
  x = jax.random.randint(key, (batch_size, _SORT_LEN), 0, _SORT_VOCAB)
  sep = jnp.full((batch_size, 1), _SORT_VOCAB)
  return jnp.concatenate([x, sep, jnp.sort(x, axis=1)], axis=1)  # (B, 2L + 1)


def _transformer_init(key, vocab=_SORT_VOCAB + 1, seq=2 * _SORT_LEN + 1, d=_T_D, layers=_T_LAYERS):
  """A pre-norm transformer's params (the sort task's sizes by default; the LM passes its own)."""
  keys = iter(jax.random.split(key, 32))

  def dense(n_in, n_out):
    return jax.random.normal(next(keys), (n_in, n_out)) / math.sqrt(n_in)

  params = {
      "embed": 0.1 * jax.random.normal(next(keys), (vocab, d)),
      "pos": 0.1 * jax.random.normal(next(keys), (seq, d)),
      "ln_f": jnp.ones(d),
      "head": dense(d, vocab) * 0.1,
  }
  for i in range(layers):
    params[f"block{i}"] = {
        "ln1": jnp.ones(d), "ln2": jnp.ones(d),
        "qkv": dense(d, 3 * d), "proj": dense(d, d) / math.sqrt(2 * layers),
        "fc": dense(d, 4 * d), "fc_b": jnp.zeros(4 * d),
        "out": dense(4 * d, d) / math.sqrt(2 * layers),
    }
  return params


def _rms_norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _transformer_logits(params, tokens, d=_T_D, heads=_T_HEADS, layers=_T_LAYERS):
  b, t = tokens.shape
  h = params["embed"][tokens] + params["pos"][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  dh = d // heads
  for i in range(layers):
    p = params[f"block{i}"]
    qkv = (_rms_norm(h, p["ln1"]) @ p["qkv"]).reshape(b, t, 3, heads, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    h = h + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d) @ p["proj"]
    h = h + jax.nn.gelu(_rms_norm(h, p["ln2"]) @ p["fc"] + p["fc_b"]) @ p["out"]
  return _rms_norm(h, params["ln_f"]) @ params["head"]


def _sort_loss_and_accuracy(params, seqs):
  logits = _transformer_logits(params, seqs[:, :-1])[:, _SORT_LEN:]  # predict the sorted half
  targets = seqs[:, _SORT_LEN + 1:]
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
  return nll, jnp.mean(jnp.argmax(logits, axis=-1) == targets)


def transformer_sort() -> Problem:
  test = _sort_batch(jax.random.key(12345), 512)
  return Problem(
      name="transformer_sort",
      description=f"2-layer pre-norm transformer (d={_T_D}, {_T_HEADS} heads) sorts "
      f"{_SORT_LEN} tokens of {_SORT_VOCAB}, batch 32; loss on the sorted half",
      init=_transformer_init,
      batch=lambda key: _sort_batch(key, 32),
      loss=lambda p, seqs: _sort_loss_and_accuracy(p, seqs)[0],
      evaluate=lambda p: _sort_loss_and_accuracy(p, test)[1],
      metric_name="held-out token accuracy",
      target=0.05,
      smooth=50,
      steps=600,
      quick_steps=200,
      lrs=(3e-4, 1e-3, 3e-3),
      warmup=50,
      # SGD and optax's adafactor (equal to ours) reached no seed's target in the full runs of
      # 2026-11-23 and 2026-12-02, adamw matched adam to 3 digits and the dense kron was 1.7x
      # slower than the default for a 1.2x lower loss; left out to keep full mode within its time.
      optimizers=("optax_rlx.kron", "optax_rlx.kron(quad)", "optax_rlx.adafactor", "optax.adam",
                  "optax.contrib.muon", "psgd_jax.kron", "psgdax.kron", "psgdax.kron(QUAD)",
                  "distributed_kron.pro", "distributed_kron.pro(QUAD)"),
  )


# -------------------------------------------------------------------------------------------
# Delayed XOR with a vanilla tanh RNN (Li's classic hard case; psgd_torch's rnn_xor_problem).
# -------------------------------------------------------------------------------------------

_XOR_BATCH, _XOR_LEN, _XOR_HIDDEN = 128, 32, 30


def _xor_batch(key, batch_size):
  """Sequences of ±1 symbols with two marked positions; label +1 iff the marked symbols differ."""
  k_sym, k_1, k_2 = jax.random.split(key, 3)
  sym = jax.random.choice(k_sym, jnp.array([-1.0, 1.0]), (batch_size, _XOR_LEN))
  i1 = jnp.floor(jax.random.uniform(k_1, (batch_size,)) * 0.1 * _XOR_LEN).astype(jnp.int32)
  i2 = jnp.floor(jax.random.uniform(k_2, (batch_size,)) * 0.4 * _XOR_LEN
                 + 0.1 * _XOR_LEN).astype(jnp.int32)
  pos = jnp.arange(_XOR_LEN)
  marks = ((pos == i1[:, None]) | (pos == i2[:, None])).astype(jnp.float32)
  rows = jnp.arange(batch_size)
  label = jnp.where(sym[rows, i1] == sym[rows, i2], -1.0, 1.0)
  return jnp.stack([sym, marks], axis=-1), label  # (B, T, 2), (B,)


def _xor_init(key):
  k_x, k_h, k_o = jax.random.split(key, 3)
  w_h, _ = jnp.linalg.qr(jax.random.normal(k_h, (_XOR_HIDDEN, _XOR_HIDDEN)))
  return {
      "w_x": 0.1 * jax.random.normal(k_x, (2, _XOR_HIDDEN)),
      "w_h": w_h,
      "b": jnp.zeros(_XOR_HIDDEN),
      "w_out": 0.1 * jax.random.normal(k_o, (_XOR_HIDDEN,)),
      "b_out": jnp.zeros(()),
  }


def _xor_logits(params, x):
  def step(h, x_t):
    return jnp.tanh(x_t @ params["w_x"] + h @ params["w_h"] + params["b"]), None

  h0 = jnp.zeros((x.shape[0], _XOR_HIDDEN))
  h, _ = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
  return h @ params["w_out"] + params["b_out"]


def delayed_xor() -> Problem:
  test_x, test_y = _xor_batch(jax.random.key(54321), 2048)

  def loss(params, batch):
    x, y = batch
    return jnp.mean(jax.nn.softplus(-y * _xor_logits(params, x)))  # −log σ(y·f(x))

  return Problem(
      name="delayed_xor",
      description=f"vanilla tanh RNN (hidden {_XOR_HIDDEN}) on delayed XOR, length {_XOR_LEN}, "
      f"batch {_XOR_BATCH}; solved = loss < 0.1 (psgd_torch's criterion)",
      init=_xor_init,
      batch=lambda key: _xor_batch(key, _XOR_BATCH),
      loss=loss,
      evaluate=lambda p: jnp.mean(jnp.sign(_xor_logits(p, test_x)) == test_y),
      metric_name="held-out accuracy",
      target=0.1,
      smooth=20,
      steps=6000,
      quick_steps=1500,
      # Every optimizer's quick curve stayed flat at 0.69 (ln 2): 1500 steps solve nothing.
      in_quick=False,
      # No optimizer solved a seed at 3e-3 in the full runs of 2026-11-23 and 2026-12-02.
      lrs=(3e-4, 1e-3),
      # Optimizers that solve it or might: the adaptive first-order ones and SGD solved no seed
      # at any lr in those runs (Adam stays as the first-order baseline).
      optimizers=("optax_rlx.kron", "optax_rlx.kron(dense)", "optax_rlx.kron(quad)", "optax.adam",
                  "optax.contrib.muon", "psgd_jax.kron", "psgdax.kron", "psgdax.kron(QUAD)",
                  "distributed_kron.pro", "distributed_kron.pro(QUAD)"),
  )


# -------------------------------------------------------------------------------------------
# Byte-level language model on real text: the running Python's standard library (no download).
# -------------------------------------------------------------------------------------------

_LM_D, _LM_HEADS, _LM_LAYERS, _LM_SEQ, _LM_BATCH = 64, 4, 2, 64, 16
_LM_TRAIN_BYTES, _LM_VALID_BYTES, _LM_VALID_WINDOWS = 4_000_000, 400_000, 64


def stdlib_text(train_bytes=_LM_TRAIN_BYTES, valid_bytes=_LM_VALID_BYTES):
  """``(train, valid)`` uint8 arrays: the stdlib's ``.py`` files, sorted by path, every tenth
  file held out for validation (split by file, not by position), each capped in size."""
  import pathlib
  import sysconfig

  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
  train, valid, n_train, n_valid = [], [], 0, 0
  for i, path in enumerate(files):
    if n_train >= train_bytes and n_valid >= valid_bytes:
      break
    data = path.read_bytes()
    if i % 10 == 0 and n_valid < valid_bytes:
      valid.append(data)
      n_valid += len(data)
    elif i % 10 != 0 and n_train < train_bytes:
      train.append(data)
      n_train += len(data)
  as_array = lambda chunks, cap: np.frombuffer(b"".join(chunks)[:cap], np.uint8)  # noqa: E731
  return as_array(train, train_bytes), as_array(valid, valid_bytes)


def _lm_init(key):
  return _transformer_init(key, vocab=256, seq=_LM_SEQ, d=_LM_D, layers=_LM_LAYERS)


def _lm_logits(params, tokens):
  return _transformer_logits(params, tokens, d=_LM_D, heads=_LM_HEADS, layers=_LM_LAYERS)


def _lm_bits_per_byte(params, windows):
  """Mean next-byte cross-entropy in bits over ``windows`` of ``_LM_SEQ + 1`` bytes."""
  logp = jax.nn.log_softmax(_lm_logits(params, windows[:, :-1]))
  nll = -jnp.take_along_axis(logp, windows[:, 1:, None].astype(jnp.int32), axis=-1)
  return jnp.mean(nll) / math.log(2.0)


def stdlib_lm() -> Problem:
  train_np, valid_np = stdlib_text()
  train = jnp.asarray(train_np)
  starts = np.linspace(0, len(valid_np) - _LM_SEQ - 2, _LM_VALID_WINDOWS).astype(np.int64)
  valid = jnp.asarray(np.stack([valid_np[s:s + _LM_SEQ + 1] for s in starts]))

  def batch(key):
    starts = jax.random.randint(key, (_LM_BATCH,), 0, train.shape[0] - _LM_SEQ - 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(train, (s,), (_LM_SEQ + 1,)))(starts)

  return Problem(
      name="stdlib_lm",
      description=f"byte-level causal transformer LM ({_LM_LAYERS} layers, d={_LM_D}, "
      f"{_LM_HEADS} heads, context {_LM_SEQ}, batch {_LM_BATCH}) on the Python standard "
      f"library's .py files ({len(train_np) / 1e6:.1f} MB train; every tenth file held out, "
      f"{_LM_VALID_WINDOWS} validation windows); loss and metric in bits per byte",
      init=_lm_init,
      batch=batch,
      loss=lambda p, windows: _lm_bits_per_byte(p, windows),
      evaluate=lambda p: _lm_bits_per_byte(p, valid),
      metric_name="validation bits/byte",
      target=2.0,
      smooth=50,
      steps=800,
      quick_steps=200,
      lrs=(1e-3, 3e-3, 1e-2),
      # Two: at 3e-3 alone Adafactor read 7.0 bits/byte (its full-mode best, 1e-2: 3.25).
      quick_lrs=(3e-3, 1e-2),
      warmup=50,
      eval_every=50,
      select_by_metric=True,
      optimizers=("optax_rlx.kron", "optax_rlx.kron(quad)", "optax.adamw", "optax_rlx.adafactor",
                  "psgd_jax.kron", "psgdax.kron", "optax.contrib.muon"),
      # The quick main job keeps to its 3 minutes.
      quick_optimizers=("optax_rlx.kron", "optax.adamw", "optax_rlx.adafactor", "psgd_jax.kron"),
      seeds=2,
  )


ALL = (least_squares, rosenbrock, rosenbrock_batched, digits_mlp, transformer_sort, delayed_xor,
       stdlib_lm)
