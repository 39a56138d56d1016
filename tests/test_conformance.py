"""The generic contract (SPEC.md section 4) that every optax_rlx optimizer must meet.

An optimizer joins by adding one ``pytest.param`` to ``OPTIMIZERS``: a factory taking the
learning rate (float or schedule) and the learning rate that solves the convergence problems.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_compat import enable_x64

import optax_rlx


@dataclasses.dataclass(frozen=True)
class Entry:
  factory: Callable[..., optax.GradientTransformation]  # called as factory(learning_rate, **kw)
  kwargs: dict
  lr: float  # a learning rate (peak of a cosine decay) that solves the problems below
  static_args: tuple[str, ...] = ()  # for optax.inject_hyperparams: shape-deciding options

  def make(self, learning_rate):
    return self.factory(learning_rate=learning_rate, **self.kwargs)


OPTIMIZERS = [
    pytest.param(
        Entry(optax_rlx.adafactor, {"multiply_by_parameter_scale": False}, lr=0.02),
        id="adafactor",
    ),
    pytest.param(
        Entry(
            optax_rlx.adafactor,
            {"b1": 0.9, "weight_decay": 1e-4, "min_dim_size_to_factor": 1,
             "multiply_by_parameter_scale": False},
            lr=0.1,
            static_args=("min_dim_size_to_factor",),
        ),
        id="adafactor-momentum-factored",
    ),
    pytest.param(Entry(optax_rlx.kron, {"key": 0}, lr=0.03), id="kron"),
    pytest.param(
        Entry(optax_rlx.kron, {"key": 1, "geometry": "triangular", "nesterov": True,
                               "weight_decay": 1e-5}, lr=0.03),
        id="kron-triangular",
    ),
    pytest.param(Entry(optax_rlx.kron, {"key": 3, "geometry": "quad"}, lr=0.03), id="kron-quad"),
    pytest.param(
        Entry(optax_rlx.kron, {"key": 2, "precond_dtype": "bfloat16", "b1": None,
                               "memory_save_mode": "one_diag"}, lr=0.01),
        id="kron-bf16-no-momentum",
    ),
]

# ---------------------------------------------------------------------------------------------
# Problems: (loss, initial params, tolerance on the final loss).
# ---------------------------------------------------------------------------------------------


def _parabola():
  target = jnp.array([1.0, -2.0, 0.5])
  return (lambda p: jnp.sum((p - target) ** 2)), jnp.zeros(3), 1e-4


def _rosenbrock():
  def loss(p):
    return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

  return loss, jnp.array([-1.2, 1.0]), 1e-2


def _matrix_parabola():
  target = jnp.array([[1.0, -1.0], [0.5, 2.0]])
  return (lambda p: jnp.sum((p - target) ** 2)), jnp.zeros((2, 2)), 1e-4


def _mixed():
  w_target = jnp.arange(12.0).reshape(3, 4) / 6.0 - 1.0
  b_target = jnp.array([0.3, -0.3, 1.0, 0.0])

  def loss(p):
    return jnp.sum((p["w"] - w_target) ** 2) + jnp.sum((p["b"] - b_target) ** 2)

  return loss, {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}, 1e-4


PROBLEMS = {
    "parabola": _parabola,
    "rosenbrock": _rosenbrock,
    "matrix_parabola": _matrix_parabola,
    "mixed": _mixed,
}
STEPS = 2000


def _fit(tx, loss, params, steps):
  state = tx.init(params)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((params, state))
  return params


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_converges(entry, problem):
  loss, params, tol = PROBLEMS[problem]()
  tx = entry.make(optax.cosine_decay_schedule(entry.lr, STEPS))
  final = float(loss(_fit(tx, loss, params, STEPS)))
  assert final < tol, (problem, final, float(loss(params)))


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_converges_on_a_complex_parabola(entry):
  """Complex params, optax's convention: the update is computed from conj(jax.grad(loss))."""
  w_target = (jnp.arange(12.0).reshape(3, 4) / 6.0 - 1.0) * (1.0 - 0.5j)
  b_target = jnp.array([0.3 + 0.1j, -0.3j, 1.0, 0.2 - 0.2j])

  def loss(p):
    return jnp.sum(jnp.abs(p["w"] - w_target) ** 2) + jnp.sum(jnp.abs(p["b"] - b_target) ** 2)

  params = {"w": jnp.zeros((3, 4), jnp.complex64), "b": jnp.zeros(4, jnp.complex64)}
  tx = entry.make(optax.cosine_decay_schedule(entry.lr, STEPS))
  state = tx.init(params)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(jax.tree.map(jnp.conj, jax.grad(loss)(p)), s, p)
    return (optax.apply_updates(p, u), s), None

  run = jax.jit(lambda c: jax.lax.scan(body, c, None, length=STEPS))
  (final, _), _ = run((params, state))
  assert float(loss(final)) < 1e-4, float(loss(final))


def _tree(dtype=jnp.float32):
  tree = {
      "w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
      "b": jnp.linspace(0.5, 1.0, 4),
      "s": jnp.asarray(0.25),
  }
  if jnp.issubdtype(dtype, jnp.complexfloating):  # a genuinely complex point
    tree = {k: v * (1.0 + 0.5j) - 0.25j * jnp.cos(3 * v) for k, v in tree.items()}
  return {k: v.astype(dtype) for k, v in tree.items()}


def _grads(params, step=0):
  return jax.tree.map(lambda p: jnp.sin(p * 3.0 + step).astype(p.dtype), params)


def _run(tx, params, steps=3, **extra):
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates = None
  for i in range(steps):
    updates, state = update(_grads(params, i), state, params, **extra)
    params = optax.apply_updates(params, updates)
  return params, state, updates


def _assert_trees_equal(a, b, exact=True):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      # A few float32 ulps of the leaf's largest entry: two compilations of the same math (a
      # traced and a constant learning rate) may round differently, and entries small next to
      # the leaf's scale inherit round-off at that scale through the shared factors.
      y = np.asarray(y)
      np.testing.assert_allclose(np.asarray(x), y, rtol=1e-6, atol=1e-6 * np.abs(y).max())


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_jit_does_not_recompile(entry):
  tx = entry.make(0.1)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(_grads(params), state, params)
    return optax.apply_updates(params, updates), state

  params = _tree()
  state = tx.init(params)
  for _ in range(4):
    params, state = step(params, state)
  assert len(traces) == 1


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_ignores_unknown_extra_args(entry):
  tx = entry.make(0.1)
  with_extra = _run(tx, _tree(), some_unknown_arg=3, another=jnp.ones(2))
  _assert_trees_equal(with_extra[0], _run(tx, _tree())[0])


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_chain_and_schedule(entry):
  schedule = optax.linear_schedule(0.1, 0.01, 10)
  chained = optax.chain(optax.clip_by_global_norm(1.0), entry.make(schedule))
  params, _, updates = _run(chained, _tree())
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert not np.allclose(params["w"], _tree()["w"])


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_masked(entry):
  tx = optax.masked(entry.make(0.1), {"w": True, "b": False, "s": True})
  params, _, _ = _run(tx, _tree())
  initial = _tree()
  plain_b = initial["b"]
  for i in range(3):  # the masked-out leaf receives the raw gradient, unchanged
    plain_b = plain_b + jnp.sin(plain_b * 3.0 + i)
  np.testing.assert_allclose(params["b"], plain_b, rtol=1e-6)
  assert not np.allclose(params["w"], initial["w"])


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_multisteps_first_minibatch_returns_exact_zeros(entry):
  tx = optax.MultiSteps(entry.make(0.1), every_k_schedule=3)
  params = _tree()
  state = tx.init(params)
  updates, state = tx.update(_grads(params), state, params)
  for u in jax.tree.leaves(updates):
    assert float(jnp.max(jnp.abs(u))) == 0.0
  for i in range(2):
    updates, state = tx.update(_grads(params, i), state, params)
  assert float(jnp.max(jnp.abs(updates["w"]))) > 0.0


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_apply_if_finite(entry):
  tx = optax.apply_if_finite(entry.make(0.1), max_consecutive_errors=2)
  params = _tree()
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan), _grads(params))
  updates, state = tx.update(bad, state, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
  updates, state = tx.update(_grads(params), state, params)
  assert float(jnp.max(jnp.abs(updates["w"]))) > 0.0


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_inject_hyperparams_matches_plain(entry):
  injected = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(
      learning_rate=0.1, **entry.kwargs
  )
  plain = entry.make(0.1)
  got, state, _ = _run(injected, _tree())
  want, _, _ = _run(plain, _tree())
  _assert_trees_equal(got, want, exact=False)
  # The injected learning rate is live: changing it in the state changes the step.
  step = jax.jit(injected.update)
  at_lr = step(_grads(got), state, got)[0]
  state.hyperparams["learning_rate"] = jnp.asarray(0.05)
  at_half = step(_grads(got), state, got)[0]
  assert not np.allclose(at_lr["w"], at_half["w"])


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_inject_hyperparams_inner_state_equals_plain_state(entry):
  """Swapping an alias for its injected form keeps the checkpoint layout (and the numbers)."""
  injected = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(
      learning_rate=0.1, **entry.kwargs
  )
  _, inner, _ = _run(injected, _tree(), steps=4)
  _, plain, _ = _run(entry.make(0.1), _tree(), steps=4)
  assert jax.tree.structure(inner.inner_state) == jax.tree.structure(plain)
  _assert_trees_equal(inner.inner_state, plain, exact=False)


@pytest.mark.parametrize("factory", [optax_rlx.kron, optax_rlx.adafactor])
@pytest.mark.parametrize("values", [{"b1": 0.0}, {"b1": 0.5}, {"weight_decay": 0.0},
                                    {"weight_decay": 1e-3}, {"b1": 0.0, "weight_decay": 0.0}])
def test_state_structure_does_not_depend_on_hyperparameter_values(factory, values):
  params = _tree()
  plain = jax.eval_shape(factory(0.1, **values).init, params)
  injected = jax.eval_shape(optax.inject_hyperparams(factory)(0.1, **values).init, params)
  assert jax.tree.structure(injected.inner_state) == jax.tree.structure(plain)
  base = jax.eval_shape(factory(0.1, **{k: 0.3 if k == "b1" else 2e-3 for k in values}).init,
                        params)
  assert jax.tree.structure(base) == jax.tree.structure(plain)


def _params_shaped_parts(state, params):
  """The subtrees of ``state`` with the params' tree structure (momenta, statistics)."""
  if jax.tree.structure(state) == jax.tree.structure(params):
    return [state]
  children, treedef = jax.tree.flatten(state, is_leaf=lambda x: x is not state)
  if treedef.num_nodes == 1 and treedef.num_leaves == 1:
    return []
  return [part for child in children for part in _params_shaped_parts(child, params)]


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_tree_map_params(entry):
  """``f`` reaches exactly the state's params-shaped parts (all of them, nothing else: Kron's
  factors are not params, so an alias without momentum has no such part at all)."""
  tx = entry.make(0.1)
  params = _tree()
  _, state, _ = _run(tx, params)
  mapped = optax.tree.map_params(tx, lambda x: jnp.full_like(x, 7.0), state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  before, after = jax.tree.leaves(state), jax.tree.leaves(mapped)
  changed = [not np.array_equal(a, b) for a, b in zip(before, after, strict=True)]
  sevens = sum(len(jax.tree.leaves(p)) for p in _params_shaped_parts(mapped, params))
  assert sum(changed) == sevens
  assert any(changed) == bool(_params_shaped_parts(state, params))
  for a, b in zip(before, after, strict=True):  # counters are not param trees: untouched
    if jnp.issubdtype(a.dtype, jnp.integer):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_tree_map_params_gives_param_specs_to_the_params_shaped_parts(entry):
  """optax's documented use: the state's partition specs from the params' (a second tree like
  the params), ``None`` for everything else."""
  tx = entry.make(0.1)
  params = _tree()
  state = tx.init(params)
  specs = jax.tree.map(lambda _: "spec", params)
  out = optax.tree.map_params(tx, lambda _, spec: spec, state, specs,
                              transform_non_params=lambda _: None)
  got = jax.tree.leaves(out)
  assert got.count("spec") == sum(len(jax.tree.leaves(p))
                                  for p in _params_shaped_parts(state, params))
  assert set(got) <= {"spec"}  # every other leaf became None (no leaf)


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_init_on_abstract_and_empty_trees(entry):
  tx = entry.make(0.1)
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), _tree())
  concrete = tx.init(_tree())
  from_abstract = tx.init(abstract)
  assert jax.tree.structure(from_abstract) == jax.tree.structure(concrete)
  shapes = jax.eval_shape(tx.init, abstract)
  for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(concrete), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
  empty_state = tx.init({})
  updates, _ = tx.update({}, empty_state, {})
  assert updates == {}


@pytest.mark.parametrize("init", ["eager", "jit"])
@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_state_can_be_donated(entry, init):
  """``jax.jit(step, donate_argnums=...)`` on the state (how large models fit in memory): no two
  leaves of a state may share a buffer, whether ``init`` ran eagerly or under jit, for a tree
  with leaves and for an empty one."""
  tx = entry.make(0.1)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
  for params in (_tree(), {}):
    state = tx.init(params) if init == "eager" else jax.jit(tx.init)(params)
    for i in range(2):
      _, state = step(_grads(params, i), state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)
               if jnp.issubdtype(x.dtype, jnp.inexact))


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_empty_leaves_are_carried_along(entry):
  tx = entry.make(0.1)
  params = {"empty": jnp.zeros((0,)), "empty2d": jnp.zeros((0, 3)), "w": jnp.ones((2, 2))}
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(_grads(params), state, params)
  assert updates["empty2d"].shape == (0, 3) and float(jnp.abs(updates["w"]).max()) > 0
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.parametrize(
    "dtype", ["float32", "bfloat16", "float16", "float64", "complex64", "complex128"]
)
@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_updates_and_state_keep_dtypes(entry, dtype):
  with enable_x64(dtype in ("float64", "complex128")):
    dtype = jnp.dtype(dtype)
    tx = entry.make(0.1)
    params = _tree(dtype)
    state = tx.init(params)
    spec = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for i in range(3):
      updates, state = jax.jit(tx.update)(_grads(params, i), state, params)
      for u in jax.tree.leaves(updates):
        assert u.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(u)))
      assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == spec
      params = optax.apply_updates(params, updates)
    assert all(p.dtype == dtype for p in jax.tree.leaves(params))


@pytest.mark.parametrize("param_dtype, grad_dtype", [
    ("float64", "float32"), ("float32", "float64"), ("bfloat16", "float32")])
@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_gradients_in_another_precision_than_the_params(entry, param_dtype, grad_dtype):
  """Mixed precision (float64 params, float32 gradients, or the reverse, under x64): the state
  keeps the params' dtypes, the updates take the gradients'. Kron refused it before 2026-12-04
  ('sizes [1] do not match sizes [1]')."""
  with enable_x64(True):
    params = _tree(jnp.dtype(param_dtype))
    tx = entry.make(0.1)
    state = tx.init(params)
    spec = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for i in range(3):
      grads = jax.tree.map(lambda g: g.astype(grad_dtype), _grads(params, i))
      updates, state = jax.jit(tx.update)(grads, state, params)
      assert all(u.dtype == jnp.dtype(grad_dtype) and bool(jnp.all(jnp.isfinite(u)))
                 for u in jax.tree.leaves(updates))
      assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == spec
      params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_state_survives_lax_cond(entry):
  tx = entry.make(0.1)
  params = _tree()
  state = tx.init(params)

  @jax.jit
  def maybe_update(pred, state):
    def do(s):
      return tx.update(_grads(params), s, params)

    def skip(s):
      return jax.tree.map(jnp.zeros_like, params), s

    return jax.lax.cond(pred, do, skip, state)

  _, updated = maybe_update(True, state)
  _, skipped = maybe_update(False, updated)
  _assert_trees_equal(skipped, updated)


@pytest.mark.parametrize("entry", OPTIMIZERS)
def test_bad_structures_raise_value_error(entry):
  tx = entry.make(0.1)
  params = _tree()
  state = tx.init(params)
  wrong_shape = dict(_grads(params), b=jnp.zeros(5))
  with pytest.raises(ValueError, match=r"\['b'\]"):
    tx.update(wrong_shape, state, params)
  missing = {k: v for k, v in _grads(params).items() if k != "s"}
  with pytest.raises(ValueError, match=r"\['s'\]"):
    tx.update(missing, state, params)
