"""From AdamW's (learning rate, weight decay) to kron's: the rule, checked on compare.py's LM.

Two parts:

1. **Learning rate**, from ``compare.py``'s own grids (``benchmarks/results/compare.json``, its
   last full run, or ``--compare PATH``): for every problem, kron's median final loss at AdamW's
   best lr, at a third of it and at a tenth (the grids step by half-decades, so a third is one step
   down and a tenth two), beside AdamW's best final loss and kron's best over its grid.
2. **Weight decay**, measured here on the byte-level LM (``compare.py``'s ``stdlib_lm``: its
   training loop, schedule, batches and validation bits/byte; 800 steps, ``--seeds`` seeds):
   AdamW at its best lr with a decay of 0.1 (the usual LM setting; ``compare.py`` runs AdamW with
   1e-4), against kron at a third of that lr with (a) the same ``weight_decay`` and (b) the
   product ``lr · weight_decay`` kept (``weight_decay`` three times AdamW's), and kron at AdamW's
   lr with its decay. Both aliases decay as ``p ← p − lr · wd · p``, so keeping ``lr · wd`` keeps
   the shrinkage per step.

Usage: ``python benchmarks/lr_transfer.py [--seeds 2] [--compare PATH]``; writes
``benchmarks/results/lr_transfer.md``.
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
import optax
from _problems import stdlib_lm
from compare import _final_loss, _make_train

import optax_rlx

HERE = os.path.dirname(__file__)


def grid_table(path: str) -> str:
  """Kron's final loss at AdamW's best lr, a third and a tenth of it, per problem."""
  with open(path) as f:
    run = json.load(f)
  lines = [f"Kron's median final loss at AdamW's best lr and below it, from `{path}` "
           f"({run['mode']} mode, {run['machine']}); AdamW is `optax.adam` where a problem "
           "has no AdamW row; the metric decides the LM (validation bits/byte).\n",
           "| problem | AdamW best lr | AdamW final | kron at lr | kron at lr/3 | kron at lr/10 "
           "| kron best (its lr) |", "|---|---:|---:|---:|---:|---:|---:|"]

  def at(grid, lr):  # the grid point within 25% (0.03 for 0.1 / 3)
    for key, value in grid.items():
      if 0.8 <= float(key) / lr <= 1.25:
        return "—" if value is None else f"{value:.3g}"
    return "not on the grid"

  for name, problem in run["problems"].items():
    rows = {r["optimizer"]: r for r in problem["results"]}
    adamw = rows.get("optax.adamw") or rows["optax.adam"]
    kron = rows["optax_rlx.kron"]
    lr = adamw["best_lr"]
    best = min((v, float(k)) for k, v in kron["grid"].items() if v is not None)
    lines.append(f"| {name} | {lr:g} | {adamw['grid'][f'{lr:g}']:.3g} | {at(kron['grid'], lr)} "
                 f"| {at(kron['grid'], lr / 3)} | {at(kron['grid'], lr / 10)} "
                 f"| {best[0]:.3g} ({best[1]:g}) |")
  return "\n".join(lines)


def decay_check(seeds: int, adamw_lr: float = 3e-3, adamw_wd: float = 0.1) -> str:
  """The LM's validation bits/byte for AdamW and kron with the weight decay carried over."""
  problem = stdlib_lm()
  third = adamw_lr / 3
  configs = {
      f"optax.adamw (lr {adamw_lr:g}, wd {adamw_wd:g})":
          lambda s, k: optax.adamw(s, weight_decay=adamw_wd),
      f"kron (lr {third:.2g}, wd {adamw_wd:g}: same wd)":
          lambda s, k: optax_rlx.kron(s, key=k, weight_decay=adamw_wd),
      f"kron (lr {third:.2g}, wd {3 * adamw_wd:g}: lr·wd kept)":
          lambda s, k: optax_rlx.kron(s, key=k, weight_decay=3 * adamw_wd),
      f"kron (lr {adamw_lr:g}, wd {adamw_wd:g}: AdamW's both)":
          lambda s, k: optax_rlx.kron(s, key=k, weight_decay=adamw_wd),
      f"kron (lr {third:.2g}, no wd)": lambda s, k: optax_rlx.kron(s, key=k),
  }
  lrs = [adamw_lr, third, third, adamw_lr, third]
  lines = [f"The LM ({problem.steps} steps, {seeds} seeds; median final validation bits/byte, "
           "and the median of the last 50 training losses):\n",
           "| optimizer | validation bits/byte | training loss |", "|---|---:|---:|"]
  for (name, make), lr in zip(configs.items(), lrs, strict=True):
    train = _make_train(problem, make, problem.steps)
    runs = [jax.block_until_ready(train(lr, seed)) for seed in range(seeds)]
    metric = statistics.median(float(r[1]) for r in runs)
    loss = statistics.median(_final_loss(np.asarray(r[0]), problem.smooth) for r in runs)
    lines.append(f"| {name} | {metric:.3f} | {loss:.3f} |")
    print(lines[-1], flush=True)
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--compare", default=os.path.join(HERE, "results", "compare.json"))
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  args = parser.parse_args(argv)
  start = time.perf_counter()
  sections = [f"`python benchmarks/lr_transfer.py` on {platform.machine()} "
              f"{jax.devices()[0].platform.upper()}, {os.cpu_count()} cores; jax "
              f"{jax.__version__}, optax {optax.__version__}.", grid_table(args.compare)]
  print(sections[-1], flush=True)
  sections.append(decay_check(args.seeds))
  sections.append(f"Total wall time {(time.perf_counter() - start) / 60:.1f} min.")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "lr_transfer.md")
  with open(path, "w") as f:
    f.write("\n\n".join(sections) + "\n")
  print("Wrote " + path)


if __name__ == "__main__":
  main()
