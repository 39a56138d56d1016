"""What the optimizers do with the inputs users feed them: the README's robustness table.

Every row trains the same small problem, a tree of a 32×16 matrix, a 16-vector and a scalar on a
rotated least squares (condition 1e4, random start), with each optimizer at its defaults
(learning rate 1e-2),
jitted, under the XLA flags this process was started with (jaxlib's defaults unless you set
``XLA_FLAGS``), and feeds it one kind of awkward input: gradients at the ends of float32's range,
zero gradients (quiet stretches, frozen leaves), a NaN, donated state, mixed precision, masks,
odd shapes. A cell says what came out: finite or not, and the loss relative to the same
optimizer's uninterrupted run (200 plain steps; < 1 is better), or the error raised.

Usage: ``python benchmarks/robustness.py [--package optax_rlx]`` (``--package`` imports another
build under another name, to compare before and after a change). Prints a Markdown table.
"""

import argparse
import importlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

STEPS = 200
LR = 1e-2
F32 = np.finfo(np.float32)


def problem():
  """Rotated least squares over a tree: ``{'w': (32, 16), 'b': (16,), 's': ()}``."""
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.standard_normal((32, 32)))
  v, _ = np.linalg.qr(rng.standard_normal((32, 32)))
  x = rng.standard_normal((256, 32)) @ u @ np.diag(np.logspace(0, 2, 32)) @ v.T
  x = jnp.asarray(x / np.sqrt(np.mean(x**2)), jnp.float32)
  y = jnp.asarray(x @ rng.standard_normal((32, 16)) + 0.5, jnp.float32)

  def loss(p):
    fit = jnp.mean((x @ p["w"] + p["b"] - y) ** 2) / jnp.mean(y**2)
    return fit + (p["s"] - 1.0) ** 2

  # Not zeros: Adafactor's steps are relative to the params' RMS.
  params = {"w": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(16), jnp.float32), "s": jnp.float32(0.5)}
  return loss, params


def finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


class Runner:
  """One optimizer on the problem, with one jitted step that scales each leaf's gradient."""

  def __init__(self, tx: optax.GradientTransformation):
    self.loss, self.params = problem()
    self.tx = tx

    @jax.jit
    def step(p, s, scales):
      grads = jax.tree.map(lambda g, c: g * c, jax.grad(self.loss)(p), scales)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    self.step = step

  def run(self, schedule: list[tuple[int, dict]]):
    """``schedule``: (steps, per-leaf gradient multipliers); returns params, state, loss."""
    p, s = self.params, self.tx.init(self.params)
    for steps, scales in schedule:
      scales = {k: jnp.float32(scales.get(k, scales.get("*", 1.0))) for k in p}
      for _ in range(steps):
        p, s = self.step(p, s, scales)
    return p, s, float(self.loss(p))


def relative(loss: float, reference: float, p, s) -> str:
  if not (finite(p) and finite(s)):
    return "**non-finite** params or state"
  return f"finite; loss ×{loss / reference:.2g}"


def scaled_rows(runner: Runner, reference: float) -> dict[str, str]:
  """Rows that only change the gradients fed to the shared step."""
  rows = {}
  for label, scale in [("Gradients ×1e-38 (smallest normals) for 40 steps, then 200 plain", 1e-38),
                       ("Subnormal gradients (×1e-42) for 40 steps, then 200 plain", 1e-42)]:
    p, s, loss = runner.run([(40, {"*": scale}), (STEPS, {})])
    rows[label] = relative(loss, reference, p, s)
  p, s, loss = runner.run([(STEPS, {"*": 1e37})])  # largest entries ~3e38
  rows["Gradients ×1e37 (entries up to ~3e38, float32's max) for 200 steps"] = relative(
      loss, reference, p, s)
  p, s, loss = runner.run([(100, {}), (300, {"*": 0.0}), (100, {})])
  rows["100 steps, 300 of all-zero gradients (frozen, then unfrozen), 100 steps"] = relative(
      loss, reference, p, s)
  p, s, _ = runner.run([(1000, {"b": 0.0})])
  b_kept = bool(jnp.all(p["b"] == runner.params["b"]))
  rows["A leaf whose gradient is exactly 0 (unused param) for 1000 steps"] = (
      ("its param unchanged, " if b_kept else "**its param moved**, ")
      + ("state finite" if finite((p, s)) else "**state non-finite**"))
  p, s, loss = runner.run([(50, {}), (1, {"w": np.nan}), (STEPS - 51, {})])
  rows["One NaN gradient (step 51)"] = (
      "NaN (propagates, documented)" if not finite(p) else relative(loss, reference, p, s))
  return rows


def guarded_nan_row(make: Callable) -> str:
  runner = Runner(optax.apply_if_finite(make(), max_consecutive_errors=5))
  _, _, reference = runner.run([(STEPS, {})])
  p, s, loss = runner.run([(50, {}), (1, {"w": np.nan}), (STEPS - 50, {})])
  return f"step skipped; {relative(loss, reference, p, s)}"


def donation_row(make: Callable) -> str:
  loss, params = problem()
  tx = make()

  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(step, donate_argnums=(0, 1))
  results = []
  for init in (tx.init, jax.jit(tx.init)):
    p = jax.tree.map(jnp.copy, params)
    p, s = step(p, init(p))
    p, s = step(p, s)
    results.append(finite((p, s)))
  return "works (eager and jitted init)" if all(results) else "**non-finite**"


def precision_row(make: Callable, param_dtype, grad_dtype) -> str:
  loss, params = problem()
  params = jax.tree.map(lambda x: x.astype(param_dtype), params)
  tx = make()

  @jax.jit
  def step(p, s):
    grads = jax.tree.map(lambda g: g.astype(grad_dtype), jax.grad(loss)(p))
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, updates

  p, s = params, tx.init(params)
  for _ in range(STEPS):
    p, s, updates = step(p, s)
  dtypes = {x.dtype for x in jax.tree.leaves(updates)}
  return (f"updates in {'/'.join(sorted(str(d) for d in dtypes))}; loss {float(loss(p)):.1e}"
          if finite(p) else "**non-finite**")


def masked_newton_row(lib) -> str:
  """Newton kron on the matrix, Adam on the rest: Kron sees a params tree with MaskedNodes."""
  loss, params = problem()
  tx = optax.multi_transform({"newton": lib.kron(LR, criterion="newton"), "adam": optax.adam(LR)},
                             {"w": "newton", "b": "adam", "s": "adam"})

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p, obj_fn=lib.fill_masked(loss, p))
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)
  for _ in range(STEPS):
    p, s = step(p, s)
  return f"works with `fill_masked`; loss {float(loss(p)):.1e}" if finite(p) else "**non-finite**"


def odd_shapes_row(make: Callable) -> str:
  params = {"empty": jnp.zeros((0, 8)), "none": None, "t5": jnp.ones((2, 3, 4, 5, 6)),
            "long": jnp.ones((1, 20000)), "s": jnp.ones(())}
  tx = make()

  def step(p, s):
    updates, s = tx.update(p, s, p)  # gradient = params
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)
  p, s = jax.jit(step)(*jax.jit(step)(p, s))
  return "works" if finite((p, s)) else "**non-finite**"


def embedding_row(make: Callable, scale: float) -> str:
  """A 256×128 matrix (factored by Adafactor; dense on both sides for Kron) whose rows 200-255
  (unseen tokens) and column 100 (a dead unit) never get a gradient, the others ``scale`` times
  an N(0, 1) gradient, for 10 steps."""
  rng = np.random.default_rng(1)
  grad = rng.standard_normal((256, 128)) * scale
  grad[200:], grad[:, 100] = 0.0, 0.0
  grad = jnp.asarray(grad, jnp.float32)
  params = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
  tx = make()

  @jax.jit
  def step(p, s):
    updates, s = tx.update(grad, s, p)
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)
  for _ in range(10):
    p, s = step(p, s)
  if not (finite(p) and finite(s)):
    return "**non-finite** params or state"
  seen, unseen = (float(jnp.sqrt(jnp.mean((p[r] - params[r]) ** 2)))
                  for r in (slice(0, 200), slice(200, None)))
  # A dense factor along the rows mixes them (as Shampoo's does): unseen rows move a little.
  return f"finite; rows moved by RMS {seen:.2g}, unseen ones {unseen:.2g}"


def safely(fn: Callable[[], str]) -> str:
  try:
    return fn()
  except Exception as e:  # a cell reports whatever broke
    return f"**{type(e).__name__}**: {str(e).splitlines()[0][:80]}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--package", default="optax_rlx", help="import name of the build to test")
  args = parser.parse_args()
  lib = importlib.import_module(args.package)
  optimizers = {
      "kron": lambda: lib.kron(LR),
      "kron, triangular": lambda: lib.kron(LR, geometry="triangular"),
      "adafactor": lambda: lib.adafactor(LR),
      "optax.adam": lambda: optax.adam(LR),
  }
  table: dict[str, dict[str, str]] = {}
  start = time.perf_counter()
  for name, make in optimizers.items():
    runner = Runner(make())
    _, _, reference = runner.run([(STEPS, {})])
    column = {"200 plain steps (the reference)": f"loss {reference:.1e}"}
    column |= scaled_rows(runner, reference)
    column["One NaN gradient, in `optax.apply_if_finite`"] = safely(
        lambda make=make: guarded_nan_row(make))
    column["State donated (`jax.jit(..., donate_argnums)`)"] = safely(
        lambda make=make: donation_row(make))
    column["bfloat16 params, float32 gradients"] = safely(
        lambda make=make: precision_row(make, jnp.bfloat16, jnp.float32))
    with jax.enable_x64(True):
      column["float64 params, float32 gradients (x64)"] = safely(
          lambda make=make: precision_row(make, jnp.float64, jnp.float32))
    column["256×128 matrix, 56 zero rows (unseen tokens), a zero column, gradients ×1e8"] = safely(
        lambda make=make: embedding_row(make, 1e8))
    column["Leaves of shape (0, 8), None, 5-D, (1, 20000), ()"] = safely(
        lambda make=make: odd_shapes_row(make))
    for row, cell in column.items():
      table.setdefault(row, {})[name] = cell
  damped = Runner(lib.kron(LR, damping=0.0))
  p, s, _ = damped.run([(1000, {"b": 0.0})])
  table["`damping=0.0`, a leaf whose gradient is exactly 0 for 1000 steps"] = {"kron": (
      "its param unchanged, state finite"
      if bool(jnp.all(p["b"] == damped.params["b"])) and finite((p, s)) else "**broken**")}
  table["Newton criterion on some leaves (`optax.multi_transform`)"] = {
      "kron": safely(lambda: masked_newton_row(lib))}
  print(f"optax_rlx robustness ({args.package}, jax {jax.__version__}, {jax.devices()[0].platform},"
        f" {time.perf_counter() - start:.0f} s)\n")
  print("| input | " + " | ".join(optimizers) + " |")
  print("|---|" + "---|" * len(optimizers))
  for row, cells in table.items():
    print(f"| {row} | " + " | ".join(cells.get(n, "—") for n in optimizers) + " |")


if __name__ == "__main__":
  main()
