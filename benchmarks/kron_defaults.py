"""Kron's defaults chosen by wall-clock and loss: seconds to AdamW's final loss, per candidate.

For each of ``compare.py``'s problems: AdamW (``compare.py``'s configuration) over the problem's lr
grid gives the *target*, its median final training loss at its best lr. Then ``optax_rlx.kron``
runs with each candidate of a study (:data:`STUDIES`: ``refit``, the refit-probability schedule;
``fit``, what the preconditioner fits, its step size and its geometry; every other option at its
default) over the same lr grid and seeds (``compare.py``'s training loop, schedule and batches),
and reports at the lr that gets there soonest:

- steps to the target: median over seeds of the first step where the running mean of the
  training loss (window ``smooth``) is at or below AdamW's final loss;
- refits up to then: the refit decisions are deterministic (a running sum of ``p(t)``, refit at
  each integer it crosses, the first step always), so they are counted from the schedule itself;
- seconds to the target: ``steps · t_keep + refits · (t_refit − t_keep)``, with ``t_refit`` and
  ``t_keep`` the candidate's median ms/step of the whole jitted training loop with
  ``precond_update_prob=1`` and with no refit at all, timed interleaved with AdamW's in the same
  run; on a shared machine this is steadier than timing each run, and it is the same sum;
- final loss: median over seeds at that lr, and the best over the grid (the loss tables must
  not get worse).

Every problem runs its full steps and lr grid, but the byte-level LM its quick grid (3e-3, 1e-2;
``compare.py``'s full run put AdamW's and kron's best at 3e-3). Its target is a training loss too.

Usage: ``python benchmarks/kron_defaults.py [--study refit|fit] [--problems a,b] [--seeds N]
[--quick]``; writes ``benchmarks/results/kron_defaults_<study>[_quick].md``.
"""

import argparse
import dataclasses
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _problems import ALL as ALL_PROBLEMS
from compare import _final_loss, _make_train, _optimizers, _steps_to_level

import optax_rlx

NEVER = 1e-9  # a refit probability whose running sum never reaches 1 in these runs

SCHEDULE = optax_rlx.precond_update_prob_schedule

# Per study: candidate name -> kron options (everything else at kron's defaults).
STUDIES = {
    "refit": {  # precond_update_prob
        "psgd_jax's (flat 500, decay 1e-3; the default until 2026-12-05)": {
            "precond_update_prob": SCHEDULE(flat_start=500)},
        "default (flat 200, decay 1e-3)": {},
        "flat 100, decay 3e-3": {"precond_update_prob": SCHEDULE(decay=3e-3, flat_start=100)},
        "flat 0, decay 1e-2": {"precond_update_prob": SCHEDULE(decay=1e-2, flat_start=0)},
        "ceiling 0.5, flat 500": {"precond_update_prob": SCHEDULE(max_prob=0.5)},
        "every step": {"precond_update_prob": 1.0},
    },
    "fit": {  # what the preconditioner fits, its step size, its geometry
        "default (momentum, precond_lr 0.1, procrustes, flat 200)": {},
        "precond_fit_on='gradient'": {"precond_fit_on": "gradient"},
        "precond_lr 0.5 -> 0.1 over 500 steps": {
            "precond_lr": optax.linear_schedule(0.5, 0.1, 500)},
        "geometry='quad'": {"geometry": "quad"},
    },
}


def refits_before(prob, steps: int) -> np.ndarray:
  """``out[t]``: refits in steps ``0 … t-1`` (``kron``'s accumulator, in float32, starts at 1:
  the first step always refits)."""
  p = np.asarray(jnp.clip(jnp.asarray(prob(jnp.arange(steps)) if callable(prob)
                                      else jnp.full(steps, prob), jnp.float32), 0, 1))
  acc, out = np.float32(1), np.zeros(steps + 1, np.int64)
  for t in range(steps):
    acc = np.float32(acc + p[t])
    refit = acc >= 1
    acc = np.float32(acc - 1) if refit else acc
    out[t + 1] = out[t] + refit
  return out


def _kron(options):
  return lambda sched, key: optax_rlx.kron(sched, key=key, **options)


def _runs(problem, make_tx, steps, seeds):
  """Per lr, per seed, the training losses (float64)."""
  train = _make_train(problem, make_tx, steps)
  compiled = train.lower(1e-3, 0).compile()
  return {lr: [np.asarray(compiled(lr, s)[0], np.float64) for s in range(seeds)]
          for lr in problem.lrs}


def _first_at(losses, smooth, level):
  """``compare.py``'s steps to ``level`` as an int, None where it is never reached."""
  step = _steps_to_level(losses, smooth, level)
  return int(step) if math.isfinite(step) else None


def _timing_key(options):
  """Options but the refit schedule: candidates that differ only there share their ms/step."""
  return repr(sorted((k, v) for k, v in options.items() if k != "precond_update_prob"))


def _ms_per_step(problems_tx, steps, reps):
  """Median ms/step of each ``(problem, make_tx)``'s whole loop, interleaved over ``reps``."""
  compiled = [_make_train(p, m, steps).lower(1e-3, 0).compile() for p, m in problems_tx]
  for c in compiled:  # a first run of each, untimed
    jax.block_until_ready(c(1e-3, 0))
  times = [[] for _ in compiled]
  for _ in range(reps):
    for i, c in enumerate(compiled):
      start = time.perf_counter()
      jax.block_until_ready(c(1e-3, 0))
      times[i].append(1e3 * (time.perf_counter() - start) / steps)
  return [statistics.median(t) for t in times]


def study(problem, candidates, steps, seeds, reps):
  """The rows of one problem's table, and its header line."""
  timing_steps = min(steps, 200)
  adamw = _optimizers()["optax.adamw"]
  # Each candidate's ms/step refitting on every step and never (shared where only the refit
  # schedule differs), and AdamW's, timed interleaved.
  pairs = {}
  for options in candidates.values():
    fixed = {k: v for k, v in options.items() if k != "precond_update_prob"}
    pairs.setdefault(_timing_key(options), fixed)
  timed = [(problem, _kron({**fixed, "precond_update_prob": p}))
           for fixed in pairs.values() for p in (1.0, NEVER)]
  times = _ms_per_step([*timed, (problem, adamw)], timing_steps, reps)
  t_adamw = times[-1]
  ms = {key: (times[2 * i], times[2 * i + 1]) for i, key in enumerate(pairs)}
  per_lr = _runs(problem, adamw, steps, seeds)
  finals = {lr: statistics.median(_final_loss(x, problem.smooth) for x in r)
            for lr, r in per_lr.items()}
  best = min(finals, key=lambda lr: (finals[lr], lr))
  target = finals[best]
  # A seed that ends above the median final loss reaches the target at its last step, as far as
  # AdamW's time goes: its run is what the target is taken from.
  hits = [_first_at(x, problem.smooth, target) for x in per_lr[best]]
  adamw_steps = statistics.median(steps if h is None else h for h in hits)
  head = (f"### {problem.name} ({steps} steps, {seeds} seeds per lr)\n\nTarget: AdamW's final "
          f"loss {target:.3g} (lr {best:g}), reached at step {adamw_steps:g}: "
          f"{adamw_steps * t_adamw / 1e3:.3g} s at {t_adamw:.3g} ms/step.\n")
  rows = [("optax.adamw", best, adamw_steps, 0, adamw_steps * t_adamw / 1e3, target, target,
           (t_adamw, t_adamw))]
  for name, options in candidates.items():
    t_refit, t_keep = ms[_timing_key(options)]
    refits = refits_before(options.get("precond_update_prob", SCHEDULE()), steps)
    per_lr = _runs(problem, _kron(options), steps, seeds)
    summary = {}
    for lr, runs in per_lr.items():
      firsts = [_first_at(x, problem.smooth, target) for x in runs]
      reached = sum(f is not None for f in firsts)
      secs = [math.inf if f is None else (f * t_keep + refits[f] * (t_refit - t_keep)) / 1e3
              for f in firsts]
      steps_hit = [math.inf if f is None else f for f in firsts]
      n_refits = [refits[f] if f is not None else math.inf for f in firsts]
      final = statistics.median(_final_loss(x, problem.smooth) for x in runs)
      summary[lr] = (-reached, statistics.median(secs), statistics.median(steps_hit),
                     statistics.median(n_refits), final)
    lr = min(summary, key=lambda k: (summary[k][0], summary[k][1], summary[k][4], k))
    _, secs, steps_hit, n_refits, final = summary[lr]
    best_final = min(s[4] for s in summary.values())
    rows.append((name, lr, steps_hit, n_refits, secs, final, best_final, (t_refit, t_keep)))
  return head, rows


def markdown(head, rows, adamw_s):
  lines = [head, "| optimizer (candidate) | lr | steps to target | refits | s to target "
           "| vs AdamW | final loss | best final over lrs | ms/step refit, none |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  fmt = lambda x, spec: "—" if not math.isfinite(x) else format(x, spec)  # noqa: E731
  for name, lr, steps_hit, refits, secs, final, best_final, (t_refit, t_keep) in rows:
    lines.append(f"| {name} | {lr:g} | {fmt(steps_hit, 'g')} | {fmt(refits, 'g')} | "
                 f"{fmt(secs, '.3g')} | {fmt(secs / adamw_s, '.2f')}x | {final:.3g} | "
                 f"{best_final:.3g} | {t_refit:.3g}, {t_keep:.3g} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--study", choices=sorted(STUDIES), default="refit")
  parser.add_argument("--problems", help="comma-separated subset of compare.py's problems")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--reps", type=int, default=3, help="timing repetitions")
  parser.add_argument("--quick", action="store_true",
                      help="quick steps, one seed, one timing rep (a smoke run)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args(argv)
  problems = [make() for make in ALL_PROBLEMS]
  if args.problems:
    problems = [p for p in problems if p.name in args.problems.split(",")]
  out = [f"`python benchmarks/kron_defaults.py --study {args.study}"
         f"{' --quick' if args.quick else ''}` on "
         f"{platform.machine()} {jax.devices()[0].platform.upper()}, {os.cpu_count()} cores; "
         f"jax {jax.__version__}, optax {optax.__version__}."]
  start = time.perf_counter()
  for problem in problems:
    steps = problem.quick_steps if args.quick else problem.steps
    lrs = problem.quick_lrs or problem.lrs  # the LM: (3e-3, 1e-2), its time is the run's
    seeds = 1 if args.quick else min(args.seeds, problem.seeds or args.seeds)
    problem = dataclasses.replace(problem, lrs=lrs)
    head, rows = study(problem, STUDIES[args.study], steps, seeds,
                       reps=1 if args.quick else args.reps)
    out.append(markdown(head, rows, rows[0][4]))
    print("\n" + out[-1], flush=True)
  out.append(f"Total wall time {(time.perf_counter() - start) / 60:.1f} min.")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"kron_defaults_{args.study}" + ("_quick" if args.quick else "")
                      + ".md")
  with open(path, "w") as f:
    f.write("\n\n".join(out) + "\n")
  print("Wrote " + path)


if __name__ == "__main__":
  main()
