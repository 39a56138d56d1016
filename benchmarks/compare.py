"""Train a suite of small problems with optax_rlx and baseline optimizers; tables, JSON and a plot.

Every (problem, optimizer) pair gets one jitted training loop (``lax.scan`` over the steps, batches
sampled inside the loop) with the peak learning rate and the seed as traced arguments, so it
compiles once and is then run for every learning rate of the problem's grid and every seed.
All optimizers use the same schedule: linear warm-up (transformer only) then cosine decay to 0.

Reported per problem and optimizer, at the best learning rate:
The best learning rate is the one where the most seeds reach the target, then the fewest median
steps to it; among those that never reach it, the one with the lowest median final loss.
- final loss: median over seeds of the mean of the last ``smooth`` training losses;
- steps to target: median over seeds of the first step where the running mean (window ``smooth``)
  of the training loss is <= the problem's target ("—" when most seeds never get there), and how
  many seeds got there;
- the problem's held-out metric (median over seeds), where it has one;
- ms/step: median over the best lr's runs of wall time / steps of the whole jitted loop (forward,
  backward, optimizer, batch sampling), with ``block_until_ready``; and its ratio to optax.adam
  measured in the same run;
- optimizer-state bytes relative to the parameters' bytes (``jax.eval_shape`` of ``init``).

Problems with ``eval_every`` (the byte-level LM on the standard library's source) also evaluate
their metric (validation bits per byte) every ``eval_every`` steps inside the loop, pick the best
lr by the final metric, run only their own optimizer list (kron, adamw, adafactor, psgd_jax's
kron), and get a second table: the steps and seconds each optimizer needs to reach AdamW's final
validation loss, and a plot of the metric against steps and against wall-clock
(``compare[_quick]_<problem>.png``).

Usage:
  python benchmarks/compare.py --quick     # <= 3 minutes on 2 idle CPU cores (2.5 measured)
  python benchmarks/compare.py             # full mode: 23 min on 2 CPU cores before the
                                           # 2026-12-05 baselines; not yet run with them (the
                                           # four small problems took 10 min more)
Quick mode runs fewer steps, one seed, and the optimizers of ``QUICK_OPTIMIZERS``; it skips the
problems whose quick curves say nothing (``in_quick=False``: delayed XOR) unless named.
Options: ``--problems a,b``, ``--optimizers x,y``, ``--seeds N``, ``--out DIR`` (default
``benchmarks/results``). Writes ``compare[_quick].md``, ``.json`` and ``.png`` there (the PNG needs
matplotlib). The other Kron ports (psgd_jax's kron, psgdax's kron in its procrustes and QUAD
modes, distributed_kron's pro and QUAD) are included when importable, each in its library's
defaults but the learning rate; ``optax.contrib.muon`` in its own.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _baselines import import_distributed_kron_pro, import_psgd_jax_kron, import_psgdax_kron
from _problems import ALL as ALL_PROBLEMS
from _problems import Problem

import optax_rlx

QUICK_OPTIMIZERS = ("optax_rlx.kron", "optax_rlx.adafactor", "optax.adam", "optax.adafactor",
                    "psgd_jax.kron")  # full mode adds the dense kron, adamw and sgd


def _optimizers() -> dict[str, Callable]:
  """name -> make(schedule, key) -> GradientTransformation, each in its default configuration."""
  table = {
      "optax_rlx.kron": lambda sched, key: optax_rlx.kron(sched, key=key),
      # psgd_jax's preconditioner structure (every axis <= 8192 dense), for a like-for-like row.
      "optax_rlx.kron(dense)": lambda sched, key: optax_rlx.kron(
          sched, key=key, max_skew_dense=math.inf),
      "optax_rlx.kron(quad)": lambda sched, key: optax_rlx.kron(sched, key=key, geometry="quad"),
      "optax_rlx.adafactor": lambda sched, key: optax_rlx.adafactor(sched),
      "optax.adam": lambda sched, key: optax.adam(sched),
      "optax.adamw": lambda sched, key: optax.adamw(sched, weight_decay=1e-4),
      "optax.adafactor": lambda sched, key: optax.adafactor(sched),
      "optax.sgd(momentum=0.9)": lambda sched, key: optax.sgd(sched, momentum=0.9),
  }
  table["optax.contrib.muon"] = lambda sched, key: optax.contrib.muon(sched)
  psgd_kron = import_psgd_jax_kron()
  if psgd_kron is not None:
    table["psgd_jax.kron"] = lambda sched, key: psgd_kron(sched)
  psgdax_kron = import_psgdax_kron()
  if psgdax_kron is not None:  # its default geometry: Q0.5EQ1.5 (procrustes)
    table["psgdax.kron"] = lambda sched, key: psgdax_kron(sched)
    table["psgdax.kron(QUAD)"] = lambda sched, key: psgdax_kron(sched, preconditioner_mode="QUAD")
  pro = import_distributed_kron_pro()
  if pro is not None:  # its defaults include weight_decay=0.1 and b1=0.95
    table["distributed_kron.pro"] = lambda sched, key: pro(sched)
    table["distributed_kron.pro(QUAD)"] = lambda sched, key: pro(
        sched, preconditioner_update_style="QUAD")
  return table


def _schedule(problem: Problem, peak, steps):
  """``peak`` (traced) times a unit warm-up + cosine-decay shape."""
  if problem.warmup:
    shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, problem.warmup, steps)
  else:
    shape = optax.cosine_decay_schedule(1.0, steps)
  return lambda count: peak * shape(count)


def _make_train(problem: Problem, make_tx, steps):
  """Returns ``train(lr, seed) -> (losses[steps], metric, metric_curve[steps])``, jitted.

  ``metric_curve`` holds the metric after every ``problem.eval_every``-th step and NaN elsewhere
  (all NaN when the problem has no ``eval_every``).
  """
  nan = jnp.float32(jnp.nan)

  def evaluate(params):
    return problem.evaluate(params).astype(jnp.float32) if problem.evaluate else nan

  def train(lr, seed):
    k_init, k_data, k_opt = jax.random.split(jax.random.key(seed), 3)
    params = problem.init(k_init)
    tx = make_tx(_schedule(problem, lr, steps), k_opt)
    state = tx.init(params)

    def step(carry, inputs):
      params, state = carry
      key, i = inputs
      loss, grads = jax.value_and_grad(problem.loss)(params, problem.batch(key))
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      metric = nan
      if problem.eval_every:
        due = (i + 1) % problem.eval_every == 0
        metric = jax.lax.cond(due, evaluate, lambda p: nan, params)
      return (params, state), (loss, metric)

    inputs = (jax.random.split(k_data, steps), jnp.arange(steps))
    (params, _), (losses, curve) = jax.lax.scan(step, (params, state), inputs)
    return losses, evaluate(params), curve

  return jax.jit(train)


def _state_ratio(problem: Problem, make_tx) -> float:
  params = jax.eval_shape(problem.init, jax.random.key(0))
  with contextlib.redirect_stdout(io.StringIO()):
    tx = make_tx(optax.constant_schedule(1e-3), jax.random.key(0))
    state = jax.eval_shape(tx.init, params)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
  return nbytes(state) / nbytes(params)


def _smoothed(losses: np.ndarray, window: int) -> np.ndarray:
  losses = np.where(np.isfinite(losses), losses, np.inf)
  if window <= 1:
    return losses
  return np.convolve(losses, np.ones(window) / window, mode="valid")


def _steps_to_level(losses: np.ndarray, smooth: int, level: float) -> float:
  """The first step where the running mean (window ``smooth``) is at or below ``level``."""
  hit = np.nonzero(_smoothed(losses, smooth) <= level)[0]
  return float(hit[0] + smooth) if len(hit) else math.inf


def _steps_to_target(losses: np.ndarray, problem: Problem) -> float:
  return _steps_to_level(losses, problem.smooth, problem.target)


def _final_loss(losses: np.ndarray, smooth: int) -> float:
  """The mean of the last ``smooth`` losses (inf if any is not finite)."""
  tail = losses[-smooth:]
  return float(np.mean(tail)) if np.all(np.isfinite(tail)) else math.inf


@dataclasses.dataclass
class Result:
  optimizer: str
  best_lr: float
  final_loss: float
  steps_to_target: float
  solved: int
  seeds: int
  metric: float | None
  ms_per_step: float
  state_ratio: float
  compile_s: float
  curve: list[float]  # median over seeds of the smoothed loss at the best lr
  grid: dict[str, float]  # lr -> median final loss (final metric with select_by_metric)
  # Problems with eval_every: (step, median metric over seeds) at the best lr.
  metric_curve: list[tuple[int, float]] | None = None


def _run_pair(problem, name, make_tx, steps, seeds, progress) -> Result:
  train = _make_train(problem, make_tx, steps)
  start = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):  # psgd_jax prints its state sizes at init
    compiled = train.lower(1e-3, 0).compile()
  compile_s = time.perf_counter() - start
  per_lr = {}
  for lr in problem.lrs:
    runs = []
    for seed in range(seeds):
      start = time.perf_counter()
      losses, metric, curve = jax.block_until_ready(compiled(lr, seed))
      elapsed = time.perf_counter() - start
      runs.append((np.asarray(losses, np.float64), float(metric), 1e3 * elapsed / steps,
                   np.asarray(curve, np.float64)))
      progress.update(1)
    per_lr[lr] = runs

  def final(losses):
    return _final_loss(losses, problem.smooth)

  def final_metric(run):
    return run[1] if math.isfinite(run[1]) else math.inf

  loss_grid = {lr: statistics.median(final(r[0]) for r in runs) for lr, runs in per_lr.items()}
  if problem.select_by_metric:  # lowest median final metric (e.g. validation loss)
    grid = {lr: statistics.median(final_metric(r) for r in runs) for lr, runs in per_lr.items()}
    best_lr = min(grid, key=lambda lr: (grid[lr], lr))
  else:
    grid = loss_grid
    hits = {lr: [_steps_to_target(r[0], problem) for r in runs] for lr, runs in per_lr.items()}
    # Most seeds solved (a lucky fast seed must not hide failing ones), then fastest to the
    # target; among lrs that never get there (or tie), the lowest final loss.
    best_lr = min(grid, key=lambda lr: (-sum(map(math.isfinite, hits[lr])),
                                        statistics.median(hits[lr]), grid[lr], lr))
  runs = per_lr[best_lr]
  steps_hit = [_steps_to_target(r[0], problem) for r in runs]
  curves = np.stack([_smoothed(r[0], problem.smooth) for r in runs])
  metric_curve = None
  if problem.eval_every:
    evals = np.median(np.stack([r[3] for r in runs]), axis=0)
    metric_curve = [(int(i + 1), float(evals[i])) for i in np.nonzero(np.isfinite(evals))[0]]
  return Result(
      optimizer=name,
      best_lr=best_lr,
      final_loss=loss_grid[best_lr],
      steps_to_target=statistics.median(steps_hit),
      solved=sum(math.isfinite(s) for s in steps_hit),
      seeds=seeds,
      metric=statistics.median(r[1] for r in runs) if problem.evaluate else None,
      ms_per_step=statistics.median(r[2] for r in runs),
      state_ratio=_state_ratio(problem, make_tx),
      compile_s=compile_s,
      curve=np.median(curves, axis=0).tolist(),
      grid={f"{lr:g}": v for lr, v in grid.items()},
      metric_curve=metric_curve,
  )


def _finite_or_none(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite_or_none(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_finite_or_none(v) for v in x]
  return x


def _fmt(x, spec):
  return "—" if x is None or not math.isfinite(x) else format(x, spec)


def _baseline(results: list[Result]) -> Result | None:
  """optax.adam, or optax.adamw where a problem runs without adam."""
  by_name = {r.optimizer: r for r in results}
  return by_name.get("optax.adam", by_name.get("optax.adamw"))


def markdown(problem: Problem, steps: int, results: list[Result]) -> str:
  adam = _baseline(results)
  metric = problem.metric_name
  head = ["optimizer", "best lr", "final loss", f"steps to {problem.target:g}", "solved"]
  head += [metric] if metric else []
  head += ["ms/step", f"vs {adam.optimizer.split('.')[-1] if adam else 'adam'}", "state/params"]
  lines = [
      f"#### {problem.name} — {problem.description}; {steps} steps",
      "",
      "| " + " | ".join(head) + " |",
      "|---|" + "---:|" * (len(head) - 1),
  ]
  for r in results:
    cells = [r.optimizer, f"{r.best_lr:g}", _fmt(r.final_loss, ".3g"),
             _fmt(r.steps_to_target, ".0f"), f"{r.solved}/{r.seeds}"]
    cells += [_fmt(r.metric, ".4g")] if metric else []
    ratio = r.ms_per_step / adam.ms_per_step if adam else math.nan
    ratio_cell = _fmt(ratio, ".2f") + ("x" if math.isfinite(ratio) else "")
    cells += [_fmt(r.ms_per_step, ".3g"), ratio_cell, f"{r.state_ratio:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  if problem.eval_every and adam is not None and adam.metric_curve:
    lines += ["", reach_table(problem, results, adam)]
  return "\n".join(lines)


def _first_step_at(curve, level):
  return next((step for step, value in curve if value <= level), math.inf)


def reach_table(problem: Problem, results: list[Result], base: Result) -> str:
  """Steps and seconds each optimizer needs to reach ``base``'s final metric (its last point)."""
  level = base.metric_curve[-1][1]
  base_steps = _first_step_at(base.metric_curve, level)
  lines = [
      f"Reaching {base.optimizer}'s final {problem.metric_name} ({level:.4f}), measured every "
      f"{problem.eval_every} steps (median over seeds at each optimizer's best lr):",
      "",
      "| optimizer | final | steps to reach | vs " + base.optimizer + " | seconds to reach "
      "| ms/step vs " + base.optimizer + " |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    if not r.metric_curve:
      continue
    steps = _first_step_at(r.metric_curve, level)
    cells = [r.optimizer, f"{r.metric_curve[-1][1]:.4f}", _fmt(steps, ".0f"),
             _fmt(steps / base_steps, ".2f"), _fmt(steps * r.ms_per_step / 1e3, ".1f"),
             _fmt(r.ms_per_step / base.ms_per_step, ".2f")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_metric_curves(path, problem: Problem, results: list[Result]):
  """The metric against steps and against wall-clock seconds (steps × median ms/step)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for r in results:
    if not r.metric_curve:
      continue
    steps, values = np.asarray(r.metric_curve).T
    label = f"{r.optimizer} (lr {r.best_lr:g})"
    axes[0].plot(steps, values, lw=1.4, label=label, **_style(r.optimizer))
    axes[1].plot(steps * r.ms_per_step / 1e3, values, lw=1.4, label=label, **_style(r.optimizer))
  for ax, xlabel in zip(axes, ("step", "wall-clock seconds (steps × median ms/step)"), strict=True):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(problem.metric_name)
    ax.legend(fontsize=7)
  fig.suptitle(f"{problem.name}: {problem.metric_name}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _style(optimizer: str) -> dict:
  """One colour per optimizer in every panel (its place in the full list), solid for
  optax_rlx's, dashed for the baselines."""
  names = [*_optimizers(), "psgd_jax.kron", "psgdax.kron", "psgdax.kron(QUAD)",
           "distributed_kron.pro", "distributed_kron.pro(QUAD)"]
  names = list(dict.fromkeys(names))
  import matplotlib

  colour = (matplotlib.colormaps["tab20"](names.index(optimizer) % 20) if optimizer in names
            else "black")
  return {"color": colour, "ls": "-" if optimizer.startswith("optax_rlx") else "--"}


def plot(path, problems, steps_of, results_of):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = 3
  rows = math.ceil(len(problems) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
  for ax, problem in zip(axes.flat, problems, strict=False):
    for r in results_of[problem.name]:
      curve = np.asarray(r.curve)
      if not np.any(np.isfinite(curve)):
        continue
      x = np.arange(len(curve)) + problem.smooth
      ax.plot(x, curve, lw=1.4, label=f"{r.optimizer} (lr {r.best_lr:g})", **_style(r.optimizer))
    ax.axhline(problem.target, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_title(f"{problem.name} ({steps_of[problem.name]} steps)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss" + (f" (mean of {problem.smooth})" if problem.smooth > 1 else ""))
    ax.legend(fontsize=6.5)
  for ax in list(axes.flat)[len(problems):]:
    ax.axis("off")
  fig.suptitle("one colour per optimizer in every panel; solid: optax_rlx, dashed: baselines",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


class _Progress:
  """tqdm on a terminal; silent otherwise (CI logs, redirected output) or without tqdm."""

  def __init__(self, total):
    self._bar = None
    if sys.stderr.isatty():
      try:
        from tqdm import tqdm
      except ImportError:
        return
      self._bar = tqdm(total=total, unit="run", dynamic_ncols=True)

  def describe(self, text):
    if self._bar is not None:
      self._bar.set_description(text)

  def write(self, text):
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def update(self, n):
    if self._bar is not None:
      self._bar.update(n)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer steps, seeds and optimizers (<= 3 minutes on 2 CPU cores)")
  parser.add_argument("--problems", help="comma-separated subset of: "
                      + ", ".join(p.__name__ for p in ALL_PROBLEMS))
  parser.add_argument("--optimizers", help="comma-separated subset of the optimizer names")
  parser.add_argument("--seeds", type=int, help="seeds per learning rate (quick 1, full 3)")
  parser.add_argument("--steps-scale", type=float, default=1.0,
                      help="multiply every problem's step count (for smoke tests)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--no-plot", action="store_true")
  args = parser.parse_args(argv)

  problems = [make() for make in ALL_PROBLEMS]
  if args.problems:
    wanted = args.problems.split(",")
    unknown = set(wanted) - {p.name for p in problems}
    if unknown:
      parser.error(f"unknown problems {sorted(unknown)}")
    problems = [p for p in problems if p.name in wanted]
  elif args.quick:
    problems = [p for p in problems if p.in_quick]
  table = _optimizers()
  names = list(table)
  if args.optimizers:
    names = args.optimizers.split(",")
    unknown = set(names) - set(table)
    if unknown:
      parser.error(f"unknown or unavailable optimizers {sorted(unknown)}; have {list(table)}")
  elif args.quick:
    names = [n for n in names if n in QUICK_OPTIMIZERS]
  default_seeds = 1 if args.quick else 3

  def seeds_of(problem):
    return args.seeds or (problem.seeds if problem.seeds and not args.quick else default_seeds)

  def names_of(problem):
    own = problem.quick_optimizers if args.quick and problem.quick_optimizers else None
    own = own or problem.optimizers
    if own is not None:  # the problem's own list, in the run's order
      pool = names if args.optimizers else list(table)
      return [n for n in pool if n in own]
    return names

  def lrs_of(problem):
    return problem.quick_lrs if args.quick and problem.quick_lrs else problem.lrs

  steps_of = {
      p.name: max(2 * p.smooth, round((p.quick_steps if args.quick else p.steps)
                                      * args.steps_scale))
      for p in problems
  }

  mode = "quick" if args.quick else "full"
  machine = (f"{platform.machine()} {jax.devices()[0].platform.upper()}, {os.cpu_count()} cores; "
             f"jax {jax.__version__}, optax {optax.__version__}")
  header = (f"`python benchmarks/compare.py{' --quick' if args.quick else ''}` ({mode} mode, "
            f"{args.seeds or default_seeds} seed(s) per lr unless a problem says otherwise) on "
            f"{machine}.")
  print(header, flush=True)
  problems = [dataclasses.replace(p, lrs=lrs_of(p)) for p in problems]
  progress = _Progress(sum(len(p.lrs) * len(names_of(p)) * seeds_of(p) for p in problems))
  results_of, sections = {}, [header]
  start = time.perf_counter()
  for problem in problems:
    results, failures = [], []
    for name in names_of(problem):
      progress.describe(f"{problem.name}: {name}")
      try:
        results.append(_run_pair(problem, name, table[name], steps_of[problem.name],
                                 seeds_of(problem), progress))
      except Exception as error:  # a baseline that cannot run this problem is reported, once
        if name.startswith("optax_rlx"):
          raise
        failures.append(f"{name} failed here: {type(error).__name__}: {str(error)[:160]}")
    results_of[problem.name] = results
    sections.append("\n\n".join([markdown(problem, steps_of[problem.name], results),
                                  *failures]))
    progress.write("\n" + sections[-1])  # each table as soon as its problem is done
  progress.close()
  total_s = time.perf_counter() - start
  sections.append(f"Total wall time {total_s / 60:.1f} min.")
  report = "\n\n".join(sections) + "\n"
  print("\n" + sections[-1], flush=True)

  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, "compare" + ("_quick" if args.quick else ""))
  with open(stem + ".md", "w") as f:
    f.write(report)
  with open(stem + ".json", "w") as f:
    json.dump({
        "mode": mode, "machine": machine, "total_seconds": total_s,
        "problems": {
            p.name: {"description": p.description, "steps": steps_of[p.name],
                     "target": p.target, "smooth": p.smooth, "metric": p.metric_name,
                     "seeds": seeds_of(p),
                     "lrs": list(p.lrs),
                     "results": [_finite_or_none(dataclasses.asdict(r))
                                 for r in results_of[p.name]]}
            for p in problems
        },
    }, f, indent=1)
  written = [stem + ".md", stem + ".json"]
  if not args.no_plot:
    try:
      plot(stem + ".png", problems, steps_of, results_of)
      written.append(stem + ".png")
      for p in problems:
        if p.eval_every:
          plot_metric_curves(f"{stem}_{p.name}.png", p, results_of[p.name])
          written.append(f"{stem}_{p.name}.png")
    except ImportError:
      print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
  print("Wrote " + ", ".join(written))


if __name__ == "__main__":
  main()
