"""Fixed-seed runs of every optimizer configuration whose numbers must not drift.

``tests/test_pinned.py`` compares these runs to ``tests/data/pinned_runs.npz``, recorded with
``python tests/pinned_runs.py`` (run it again only when a change of the numbers is intended, and
say so in the commit). A pure refactor must reproduce the file bit for bit.
"""

import os
import platform
import sys
from pathlib import Path

import xla_test_flags

xla_test_flags.apply()  # the test session's flags, also when this file records

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optax_rlx  # noqa: E402

DATA = Path(__file__).parent / "data" / "pinned_runs.npz"
STEPS = 12


def _params():
  rng = np.random.default_rng(20261202)
  shapes = {
      "w": (12, 8), "wide": (24, 6), "tall": (5, 20), "cube": (4, 3, 5),
      "b": (7,), "s": (), "stack": (3, 6, 4), "long": (16, 6),
  }
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _targets(params):
  rng = np.random.default_rng(7)
  return {k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for k, p in params.items()}


def _loss(params, targets):
  """A coupled, non-quadratic loss so that Hessian-vector products are not constant."""
  total = 0.0
  for k in sorted(params):
    d = params[k] - targets[k]
    total = total + jnp.sum(d * d) + 0.1 * jnp.sum(d**4) + 0.05 * jnp.sum(jnp.cos(params[k]))
  return total


def _kron(**kw):
  stacked = {k: k == "stack" for k in _params()}
  return optax_rlx.kron(3e-2, key=11, stacked_layers=stacked, block_size=8, **kw)


CASES = {
    "kron_whitening_procrustes": lambda: _kron(),
    "kron_whitening_triangular": lambda: _kron(geometry="triangular", nesterov=True,
                                               weight_decay=1e-3),
    "kron_newton_procrustes": lambda: _kron(criterion="newton"),
    "kron_newton_triangular": lambda: _kron(criterion="newton", geometry="triangular"),
    "kron_dense_prob": lambda: _kron(max_skew_dense=float("inf"), precond_update_prob=0.4,
                                     precond_fit_on="gradient", precond_init_scale=0.5),
    "kron_bf16_diag": lambda: _kron(precond_dtype="bfloat16", mu_dtype="bfloat16",
                                    memory_save_mode="one_diag", b1=None),
    "adafactor_paper": lambda: optax_rlx.adafactor(min_dim_size_to_factor=4),
    "adafactor_momentum": lambda: optax_rlx.adafactor(
        optax.cosine_decay_schedule(0.05, 20), b1=0.9, weight_decay=1e-2,
        multiply_by_parameter_scale=False, factoring="last_two", min_dim_size_to_factor=1),
    "adafactor_torch": lambda: optax_rlx.adafactor(
        optax_rlx.relative_step_schedule(1e-2), epsilon1=0.0, variance_floor=1.1920929e-07,
        factoring="last_two", min_dim_size_to_factor=1, beta2_cap=0.999),
}


def run(name):
  """``{leaf path: array}`` of the final params and state after ``STEPS`` jitted steps."""
  tx = CASES[name]()
  params = _params()
  targets = _targets(params)

  @jax.jit
  def step(params, state):
    obj_fn = lambda p: _loss(p, targets)  # noqa: E731
    grads = jax.grad(obj_fn)(params)
    updates, state = tx.update(grads, state, params, obj_fn=obj_fn)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(STEPS):
    params, state = step(params, state)
  # Kron's factors per leaf (``FactorGroups.by_leaf``), so records name them by param.
  is_groups = lambda x: isinstance(x, optax_rlx.FactorGroups)  # noqa: E731
  state = jax.tree.map(lambda x: x.by_leaf() if is_groups(x) else x, state, is_leaf=is_groups)
  flat = jax.tree_util.tree_flatten_with_path((params, state))[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def fingerprint():
  """What decides XLA's CPU code: versions, architecture, processor model and vector units."""
  cpu, flags = platform.processor(), ""
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    found = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    flags = " ".join(sorted(f for f in found if f.startswith(("avx", "fma", "amx"))))
  except OSError:
    pass
  return (f"jax {jax.__version__}; jaxlib {jax.lib.__version__}; {platform.machine()}; {cpu}; "
          f"{flags}; XLA_FLAGS {os.environ.get('XLA_FLAGS', '')}")


def refresh_fingerprint():
  """Rewrites only the record's fingerprint (the arrays stay byte for byte as recorded)."""
  with np.load(DATA) as data:
    arrays = {k: data[k] for k in data.files}
  arrays["__fingerprint__"] = np.asarray(fingerprint())
  np.savez_compressed(DATA, **arrays)


def record():
  arrays = {"__fingerprint__": np.asarray(fingerprint())}
  for name in CASES:
    for path, x in run(name).items():
      arrays[f"{name}|{path}"] = x
  DATA.parent.mkdir(exist_ok=True)
  np.savez_compressed(DATA, **arrays)
  return len(arrays)


if __name__ == "__main__":
  sys.exit(print(f"recorded {record()} arrays in {DATA}") or 0)
