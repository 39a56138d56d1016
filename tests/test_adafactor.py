"""Adafactor against float64 transcriptions of the paper and torch's rule, optax, and invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax_compat import enable_x64

import optax_rlx

# ---------------------------------------------------------------------------------------------
# Float64 NumPy references, written from the papers' pseudo-code.
# ---------------------------------------------------------------------------------------------


class PaperAdafactor:
  """Shazeer & Stern (2018), Alg. 4 (matrices) / Alg. 5 (vectors) with Alg. 6 defaults, float64.

  Written with the paper's *sums*: R = β R + (1-β)(G²+ε1) 1_m, C = β C + (1-β) 1_nᵀ(G²+ε1),
  V̂ = R C / (1_nᵀ R); the library uses means. ``axes`` gives (row_axis, col_axis) per leaf or
  None for a full second moment; other axes are batch axes.
  """

  def __init__(self, params, axes, eps1=1e-30, eps2=1e-3, d=1.0, decay=0.8, lr=None):
    self.p = {k: np.asarray(v, np.complex128 if np.iscomplexobj(v) else np.float64)
              for k, v in params.items()}
    self.axes, self.eps1, self.eps2, self.d, self.decay, self.lr = axes, eps1, eps2, d, decay, lr
    self.t = 0
    self.R, self.C, self.V = {}, {}, {}
    for k, v in self.p.items():
      if axes[k] is None:
        self.V[k] = np.zeros_like(v)
      else:
        r, c = axes[k]
        self.R[k] = np.zeros(np.delete(v.shape, c))
        self.C[k] = np.zeros(np.delete(v.shape, r))

  def step(self, grads):
    self.t += 1
    t = self.t
    beta = 1.0 - t ** (-self.decay)
    rho = min(1e-2, 1.0 / np.sqrt(t)) if self.lr is None else self.lr
    for k, x in self.p.items():
      g = np.asarray(grads[k], np.complex128 if np.iscomplexobj(grads[k]) else np.float64)
      g2 = np.abs(g) ** 2 + self.eps1
      if self.axes[k] is None:
        self.V[k] = beta * self.V[k] + (1 - beta) * g2
        v_hat = self.V[k]
      else:
        r, c = self.axes[k]
        self.R[k] = beta * self.R[k] + (1 - beta) * g2.sum(axis=c)
        self.C[k] = beta * self.C[k] + (1 - beta) * g2.sum(axis=r)
        r_in_row = r - 1 if r > c else r
        total = self.R[k].sum(axis=r_in_row, keepdims=True)
        v_hat = (
            np.expand_dims(self.R[k], c)
            * np.expand_dims(self.C[k], r)
            / np.expand_dims(total, c)
        )
      u = g / np.sqrt(v_hat)
      u = u / max(1.0, np.sqrt(np.mean(np.abs(u) ** 2)) / self.d)
      alpha = max(self.eps2, np.sqrt(np.mean(np.abs(x) ** 2))) * rho
      self.p[k] = x - alpha * u
    return self.p


FLOAT32_EPS = float(np.finfo(np.float32).eps)


class TorchAdafactorRule:
  """The update rule of ``torch.optim.Adafactor`` (PyTorch >= 2.5), float64, single-tensor form.

  ρ_t = min(lr, 1/√t); α_t = max(ε2, RMS(θ_{t-1})) ρ_t; θ ← θ (1 - lr λ); for ndim > 1 the last
  two axes are factored with row/column *means*, V̂ = R Cᵀ / max(mean(R), ε1); for vectors
  V = EMA(G²); U = G / √max(V̂, ε1²); θ ← θ - α_t U / max(1, RMS(U)/d).
  """

  def __init__(self, params, lr=1e-2, weight_decay=0.0, eps1=FLOAT32_EPS,
               eps2=1e-3, d=1.0, beta2_decay=-0.8):
    self.p = {k: np.asarray(v, np.complex128 if np.iscomplexobj(v) else np.float64)
              for k, v in params.items()}
    self.lr, self.wd, self.eps1, self.eps2, self.d = lr, weight_decay, eps1, eps2, d
    self.beta2_decay = beta2_decay
    self.t = 0
    self.state = {}
    for k, v in self.p.items():
      if v.ndim > 1:
        self.state[k] = (np.zeros((*v.shape[:-1], 1)), np.zeros((*v.shape[:-2], 1, v.shape[-1])))
      else:
        self.state[k] = np.zeros_like(v)

  def step(self, grads):
    self.t += 1
    w = self.t**self.beta2_decay  # 1 - β̂₂
    rho = min(self.lr, 1 / np.sqrt(self.t))
    for k, x in self.p.items():
      g = np.asarray(grads[k], np.float64)
      alpha = max(self.eps2, np.sqrt(np.mean(x * x))) * rho
      x = x * (1 - self.lr * self.wd)
      if g.ndim > 1:
        row, col = self.state[k]
        row = row + w * ((g * g).mean(axis=-1, keepdims=True) - row)
        col = col + w * ((g * g).mean(axis=-2, keepdims=True) - col)
        self.state[k] = (row, col)
        var = row * col / np.maximum(row.mean(axis=-2, keepdims=True), self.eps1)
      else:
        var = self.state[k] = self.state[k] + w * (g * g - self.state[k])
      u = g / np.sqrt(np.maximum(var, self.eps1**2))
      denom = max(1.0, np.linalg.norm(u) / (np.sqrt(u.size) * self.d))
      self.p[k] = x - alpha / denom * u
    return self.p


def _params(rng, shapes):
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _grad_sequence(rng, shapes, steps):
  """Gradients with a per-row/per-column scale structure (so factoring matters) and noise."""
  out = []
  scales = {k: np.exp(rng.uniform(-2, 2, s)) for k, s in shapes.items()}
  for _ in range(steps):
    out.append(
        {k: (scales[k] * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    )
  return out


def _run(tx, params, grads_seq, jit=True):
  state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step) if jit else step
  for g in grads_seq:
    params, state = step(params, state, g)
  return params, state


# ---------------------------------------------------------------------------------------------
# The paper, in every rank.
# ---------------------------------------------------------------------------------------------

PAPER_SHAPES = {
    "matrix": (24, 40),
    "tall": (64, 3),
    "tensor3": (6, 20, 32),  # factored over (20, 32), batch axis 0
    "tensor4": (3, 5, 16, 12),  # largest two axes: 2 and 3
    "vector": (17,),
    "scalar": (),
}


def _largest_two(shape):
  if len(shape) < 2:
    return None
  order = np.argsort(shape, kind="stable")
  return int(order[-2]), int(order[-1])


def _complex(rng, real_tree):
  """A complex tree of the same shapes: the real parts given, new imaginary parts like them."""
  return {
      k: (v + 1j * rng.standard_normal(np.shape(v)) * np.abs(v).mean()).astype(np.complex64)
      for k, v in real_tree.items()
  }


@pytest.mark.parametrize("learning_rate", [None, 3e-2])
@pytest.mark.parametrize("b1", [None, 0.9])
def test_complex_gradients_match_float64_reference(rng, learning_rate, b1):
  """Statistics of |g|² (real, float32), complex updates in the gradient's dtype (25 steps)."""
  params = _complex(rng, _params(rng, PAPER_SHAPES))
  grads = [_complex(rng, g) for g in _grad_sequence(rng, PAPER_SHAPES, steps=25)]
  axes = {k: _largest_two(s) for k, s in PAPER_SHAPES.items()}
  ref = PaperAdafactor(params, axes, lr=learning_rate)
  mu = {k: np.zeros_like(v, np.complex128) for k, v in params.items()}
  for g in grads:
    before = {k: v.copy() for k, v in ref.p.items()}
    expected = ref.step(g)
    if b1 is not None:  # momentum averages the final scaled step (no bias correction)
      for k in expected:
        mu[k] = (1 - b1) * (before[k] - expected[k]) + b1 * mu[k]
        expected[k] = before[k] - mu[k]
  tx = optax_rlx.adafactor(learning_rate, min_dim_size_to_factor=1, b1=b1)
  got, state = _run(tx, params, grads)
  for k in PAPER_SHAPES:
    assert got[k].dtype == np.complex64, k
    atol = 1e-6 * max(1.0, np.abs(params[k]).max())
    assert np.abs(expected[k] - params[k]).max() > 100 * atol, k
    np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=atol, err_msg=k)
  for leaf in jax.tree.leaves(state[0])[1:]:
    assert leaf.dtype == np.float32
  if b1 is not None:
    assert all(m.dtype == np.complex64 for m in jax.tree.leaves(state[1].mu))


def test_complex_momentum_dtype_is_the_complex_counterpart_of_mu_dtype():
  params = {"w": jnp.zeros((4, 3), jnp.complex64)}
  state = optax_rlx.adafactor(1e-2, b1=0.9, mu_dtype="bfloat16").init(params)
  assert state[1].mu["w"].dtype == jnp.complex64  # no complex bfloat16: the nearest, complex64
  with enable_x64(True):
    params = {"w": jnp.zeros((4, 3), jnp.complex128)}
    state = optax_rlx.adafactor(1e-2, b1=0.9, mu_dtype=jnp.float64).init(params)
    assert state[1].mu["w"].dtype == jnp.complex128
    assert state[0].v["w"].dtype == jnp.float64


@pytest.mark.parametrize("learning_rate", [None, 3e-2])
def test_matches_float64_paper_reference(rng, learning_rate):
  params = _params(rng, PAPER_SHAPES)
  grads = _grad_sequence(rng, PAPER_SHAPES, steps=25)
  axes = {k: _largest_two(s) for k, s in PAPER_SHAPES.items()}
  ref = PaperAdafactor(params, axes, lr=learning_rate)
  for g in grads:
    expected = ref.step(g)
  tx = optax_rlx.adafactor(learning_rate, min_dim_size_to_factor=1)
  got, state = _run(tx, params, grads)
  for k in PAPER_SHAPES:
    atol = 1e-6 * max(1.0, np.abs(params[k]).max())
    assert np.abs(expected[k] - params[k]).max() > 100 * atol, k  # the reference really moved
    np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=atol, err_msg=k)
  # Factored leaves really are factored, with O(rows + cols) state.
  assert state[0].v_row["matrix"].shape == (24, 1) and state[0].v_col["matrix"].shape == (1, 40)
  assert state[0].v_row["tensor3"].shape == (6, 20, 1)
  assert state[0].v_col["tensor3"].shape == (6, 1, 32)
  assert state[0].v["scalar"].shape == ()


def test_rank_one_second_moment_is_exact():
  """When G² = r cᵀ exactly, V̂ = G² on the first step (β̂₂ = 0), so |U| = 1 everywhere."""
  a = np.array([0.5, -2.0, 3.0, 1e-2, 7.0], np.float32)
  b = np.array([1.0, -0.25, 4.0, 2.0], np.float32)
  g = np.outer(a, b)
  tx = optax_rlx.scale_by_adafactor(min_dim_size_to_factor=1, clipping_threshold=None)
  u, _ = tx.update(jnp.asarray(g), tx.init(jnp.zeros_like(g)))
  np.testing.assert_allclose(np.asarray(u), np.sign(g), rtol=2e-6)


def test_rank_one_exact_for_stationary_gradients_over_steps(rng):
  r, c = np.exp(rng.standard_normal(9)), np.exp(rng.standard_normal(13))
  tx = optax_rlx.scale_by_adafactor(min_dim_size_to_factor=1, clipping_threshold=None)
  state = tx.init(jnp.zeros((9, 13)))
  for _ in range(10):
    signs = rng.choice([-1.0, 1.0], size=(9, 13))
    g = (signs * np.sqrt(np.outer(r, c))).astype(np.float32)
    u, state = tx.update(jnp.asarray(g), state)
    np.testing.assert_allclose(np.asarray(u), signs, rtol=1e-5)


@pytest.mark.parametrize("factoring", ["largest_two", "last_two"])
def test_transpose_invariance(rng, factoring):
  grads = _grad_sequence(rng, {"w": (12, 30)}, steps=8)
  tx = optax_rlx.scale_by_adafactor(min_dim_size_to_factor=1, factoring=factoring)
  s1, s2 = tx.init(jnp.zeros((12, 30))), tx.init(jnp.zeros((30, 12)))
  for g in grads:
    u1, s1 = tx.update(jnp.asarray(g["w"]), s1)
    u2, s2 = tx.update(jnp.asarray(g["w"].T), s2)
    np.testing.assert_allclose(np.asarray(u2), np.asarray(u1).T, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [1e-4, 1e4])
@pytest.mark.parametrize("shape", [(16, 24), (5, 8, 6), (11,)])
def test_direction_invariant_to_gradient_scale(rng, scale, shape):
  grads = _grad_sequence(rng, {"w": shape}, steps=6)
  tx = optax_rlx.scale_by_adafactor(min_dim_size_to_factor=1)
  s1 = s2 = tx.init(jnp.zeros(shape))
  for g in grads:
    u1, s1 = tx.update(jnp.asarray(g["w"]), s1)
    u2, s2 = tx.update(jnp.asarray(g["w"] * scale), s2)
    np.testing.assert_allclose(np.asarray(u2), np.asarray(u1), rtol=2e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    threshold=st.floats(0.05, 3.0),
    log_scale=st.floats(-3, 3),
    seed=st.integers(0, 2**16),
    shape=st.sampled_from([(7, 9), (4, 3, 5), (13,), ()]),
)
def test_update_rms_never_exceeds_clipping_threshold(threshold, log_scale, seed, shape):
  g = np.random.default_rng(seed).standard_normal(shape) * 10.0**log_scale
  # A sparse gradient makes RMS(U) large, so the clip must act.
  g = np.where(np.random.default_rng(seed + 1).random(shape) < 0.2, g, 0.0).astype(np.float32)
  tx = optax_rlx.scale_by_adafactor(clipping_threshold=threshold, min_dim_size_to_factor=1)
  state = tx.init(jnp.zeros(shape))
  for _ in range(3):
    u, state = tx.update(jnp.asarray(g), state)
    rms = float(jnp.sqrt(jnp.mean(u.astype(jnp.float32) ** 2)))
    assert rms <= threshold * (1 + 1e-5)


def test_clipping_fires_at_threshold():
  """After 10 zero steps a unit gradient meets V = 11^-0.8, so RMS(U) = 11^0.4 ≈ 2.6 > d = 1."""
  for clip, expected_rms in [(1.0, 1.0), (None, 11**0.4)]:
    tx = optax_rlx.scale_by_adafactor(clipping_threshold=clip, min_dim_size_to_factor=1)
    state = tx.init(jnp.zeros((3, 4)))
    for _ in range(10):
      state = tx.update(jnp.zeros((3, 4)), state)[1]
    u, _ = tx.update(jnp.ones((3, 4)), state)
    np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(u**2))), expected_rms, rtol=1e-5)


def test_seed_sum_normaliser_bug_is_absent():
  """The seed divided by Σ R, not its mean: updates √rows too large. Ours is exact on rank 1."""
  g = np.ones((64, 32), np.float32)
  tx = optax_rlx.scale_by_adafactor(min_dim_size_to_factor=1, clipping_threshold=None)
  u, _ = tx.update(jnp.asarray(g), tx.init(jnp.zeros((64, 32))))
  np.testing.assert_allclose(np.asarray(u), 1.0, rtol=1e-6)  # the seed gives √64 = 8


# ---------------------------------------------------------------------------------------------
# Parity with optax.adafactor and torch.optim.Adafactor.
# ---------------------------------------------------------------------------------------------

OPTAX_SHAPES = {
    "w": (256, 160),
    "stacked": (4, 130, 200),
    "b": (160,),
    "s": (),
    "small": (5, 7),
    "odd": (128, 3, 128),
}


@pytest.mark.parametrize(
    "optax_kwargs, ours_kwargs",
    [
        ({"learning_rate": 1e-2}, {"learning_rate": 1e-2}),
        (
            {"learning_rate": 1e-2, "momentum": 0.9},
            {"learning_rate": 1e-2, "b1": 0.9, "mu_dtype": jnp.float32},
        ),
        (
            {"learning_rate": optax.linear_schedule(1e-2, 1e-3, 20),
             "multiply_by_parameter_scale": False, "clipping_threshold": None},
            {"learning_rate": optax.linear_schedule(1e-2, 1e-3, 20),
             "multiply_by_parameter_scale": False, "clipping_threshold": None},
        ),
        (
            {"learning_rate": 3e-3, "min_dim_size_to_factor": 4, "decay_rate": 0.6,
             "eps": 1e-20},
            {"learning_rate": 3e-3, "min_dim_size_to_factor": 4, "decay_rate": 0.6,
             "epsilon1": 1e-20},
        ),
    ],
    ids=["constant-lr", "momentum", "schedule-no-scale-no-clip", "small-factor-decay-eps"],
)
def test_bit_identical_to_optax_adafactor_under_jit(rng, optax_kwargs, ours_kwargs):
  params = _params(rng, OPTAX_SHAPES)
  grads = _grad_sequence(rng, OPTAX_SHAPES, steps=20)
  expected, _ = _run(optax.adafactor(**optax_kwargs), params, grads)
  got, _ = _run(optax_rlx.adafactor(**ours_kwargs), params, grads)
  for k in OPTAX_SHAPES:
    assert not np.array_equal(expected[k], params[k])
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(expected[k]), err_msg=k)


def test_optax_weight_decay_rate_is_ours_divided_by_lr(rng):
  params = _params(rng, OPTAX_SHAPES)
  grads = _grad_sequence(rng, OPTAX_SHAPES, steps=20)
  expected, _ = _run(optax.adafactor(1e-2, weight_decay_rate=1e-3), params, grads)
  got, _ = _run(optax_rlx.adafactor(1e-2, weight_decay=1e-3 / 1e-2), params, grads)
  for k in OPTAX_SHAPES:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(expected[k]), rtol=1e-6, atol=1e-6)


TORCH_CONFIG = {
    "epsilon1": 0.0,
    "variance_floor": float(np.finfo(np.float32).eps),
    "factoring": "last_two",
    "min_dim_size_to_factor": 1,
}


@pytest.mark.parametrize("lr, weight_decay", [(1e-2, 0.0), (3e-2, 0.1)])
def test_matches_torch_adafactor_rule(rng, lr, weight_decay):
  shapes = {"w": (20, 36), "row": (1, 50), "t3": (3, 10, 4), "t4": (2, 3, 4, 5), "v": (9,)}
  params = _params(rng, shapes)
  grads = _grad_sequence(rng, shapes, steps=25)
  grads[3]["v"][:] = 0.0  # a zero gradient exercises the ε1 clamps
  ref = TorchAdafactorRule(params, lr=lr, weight_decay=weight_decay)
  for g in grads:
    expected = ref.step(g)
  tx = optax_rlx.adafactor(
      optax_rlx.relative_step_schedule(lr), weight_decay=weight_decay, **TORCH_CONFIG
  )
  got, _ = _run(tx, params, grads)
  for k in shapes:
    atol = 1e-6 * max(1.0, np.abs(params[k]).max())
    assert np.abs(expected[k] - params[k]).max() > 100 * atol, k
    np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=0, atol=atol, err_msg=k)


# ---------------------------------------------------------------------------------------------
# Factoring policies, stacked layers, memory.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factoring", ["last_two", "largest_two"])
def test_stacked_layers_get_per_layer_statistics(rng, factoring):
  """A (L, n, m) leaf has the second moments of L separate (n, m) leaves.

  The RMS clip acts on the whole leaf (as in optax and the paper), so it is off here.
  """
  shapes = {"w": (3, 20, 24)}
  grads = _grad_sequence(rng, shapes, steps=6)
  tx = optax_rlx.scale_by_adafactor(
      factoring=factoring, min_dim_size_to_factor=1, clipping_threshold=None
  )
  stacked = tx.init(jnp.zeros(shapes["w"]))
  layers = tx.init([jnp.zeros((20, 24))] * 3)
  for g in grads:
    u_stacked, stacked = tx.update(jnp.asarray(g["w"]), stacked)
    u_layers, layers = tx.update([jnp.asarray(x) for x in g["w"]], layers)
    np.testing.assert_allclose(np.asarray(u_stacked), np.stack(u_layers), rtol=1e-6, atol=1e-7)
  assert stacked.v_row.shape == (3, 20, 1) and stacked.v_col.shape == (3, 1, 24)


def _gpt2_small_shapes(vocab=50257, ctx=1024, d=768, layers=12):
  shapes = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f": {"g": (d,), "b": (d,)}}
  for i in range(layers):
    shapes[f"h{i}"] = {
        "ln_1": {"g": (d,), "b": (d,)},
        "attn": {"c_attn": {"w": (d, 3 * d), "b": (3 * d,)},
                 "c_proj": {"w": (d, d), "b": (d,)}},
        "ln_2": {"g": (d,), "b": (d,)},
        "mlp": {"c_fc": {"w": (d, 4 * d), "b": (4 * d,)},
                "c_proj": {"w": (4 * d, d), "b": (d,)}},
    }
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_gpt2_small_state_memory_is_sublinear():
  params = _gpt2_small_shapes()
  num_params = sum(x.size for x in jax.tree.leaves(params))
  assert 124e6 < num_params < 125e6
  state = jax.eval_shape(optax_rlx.adafactor().init, params)
  per_param = _nbytes(state) / num_params
  assert per_param <= 0.011, per_param
  adam_per_param = _nbytes(jax.eval_shape(optax.adam(1e-3).init, params)) / num_params
  assert adam_per_param > 7.9  # sanity check of the measure: Adam keeps 2 fp32 copies
  with_momentum = jax.eval_shape(optax_rlx.adafactor(b1=0.9, mu_dtype=jnp.bfloat16).init, params)
  assert 2.0 < _nbytes(with_momentum) / num_params < 2.011


# ---------------------------------------------------------------------------------------------
# Step size, momentum, weight decay, β̂₂ schedule.
# ---------------------------------------------------------------------------------------------


def test_relative_step_first_update_is_one_percent_of_param_rms():
  theta = jnp.asarray(np.linspace(-3, 3, 11), jnp.float32)
  g = jnp.asarray(np.linspace(-1, 1.2, 11), jnp.float32)
  tx = optax_rlx.adafactor()
  u, _ = tx.update(g, tx.init(theta), theta)
  rms = float(jnp.sqrt(jnp.mean(theta**2)))
  # First step: V = G² exactly, so U = sign(G), RMS(U) = 1 and no clipping.
  np.testing.assert_allclose(np.asarray(u), -1e-2 * rms * np.sign(np.asarray(g)), rtol=1e-6)
  tx_explicit = optax_rlx.adafactor(optax_rlx.relative_step_schedule(1e-2))
  u2, _ = tx_explicit.update(g, tx_explicit.init(theta), theta)
  np.testing.assert_array_equal(np.asarray(u), np.asarray(u2))


def test_relative_step_schedule_values():
  rho = optax_rlx.relative_step_schedule(1e-2)
  counts = np.array([0, 1, 9_999, 10_000, 39_999, 999_999])
  expected = np.minimum(1e-2, 1 / np.sqrt(counts + 1.0))
  np.testing.assert_allclose(np.asarray(jax.vmap(rho)(counts)), expected, rtol=1e-6)


def test_weight_decay_is_decoupled_scaled_by_lr_and_masked(rng):
  params = {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(6), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  lr, wd = 0.05, 0.3
  base = optax_rlx.adafactor(lr)
  decayed = optax_rlx.adafactor(lr, weight_decay=wd, weight_decay_mask={"w": True, "b": False})
  u0, _ = base.update(grads, base.init(params), params)
  u1, _ = decayed.update(grads, decayed.init(params), params)
  np.testing.assert_allclose(u1["w"] - u0["w"], -lr * wd * params["w"], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(u1["b"], u0["b"])
  by_fn = optax_rlx.adafactor(lr, weight_decay=wd, weight_decay_mask=lambda p: {"w": False,
                                                                                 "b": True})
  u2, _ = by_fn.update(grads, by_fn.init(params), params)
  np.testing.assert_array_equal(u2["w"], u0["w"])
  np.testing.assert_allclose(u2["b"] - u0["b"], -lr * wd * params["b"], rtol=1e-5, atol=1e-7)


def test_momentum_is_an_ema_of_the_scaled_step(rng):
  params = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
  grads = _grad_sequence(rng, {"w": (6, 5)}, steps=5)
  plain, heavy = optax_rlx.adafactor(0.1), optax_rlx.adafactor(0.1, b1=0.8)
  s0, s1 = plain.init(params), heavy.init(params)
  m = np.zeros((6, 5))
  for g in grads:
    u0, s0 = plain.update(jnp.asarray(g["w"]), s0, params)
    u1, s1 = heavy.update(jnp.asarray(g["w"]), s1, params)
    m = 0.8 * m + 0.2 * np.asarray(u0, np.float64)
    np.testing.assert_allclose(np.asarray(u1), m, rtol=1e-5, atol=1e-8)


def test_bf16_momentum(rng):
  params = {"w": jnp.asarray(rng.standard_normal((32, 16)), jnp.bfloat16)}
  grads = _grad_sequence(rng, {"w": (32, 16)}, steps=30)
  tx = optax_rlx.adafactor(1e-2, b1=0.9, mu_dtype=jnp.bfloat16)
  ref = optax_rlx.adafactor(1e-2, b1=0.9, mu_dtype=jnp.float32)
  got, state = _run(tx, params, [{"w": jnp.asarray(g["w"], jnp.bfloat16)} for g in grads])
  want, _ = _run(ref, params, [{"w": jnp.asarray(g["w"], jnp.bfloat16)} for g in grads])
  assert state[1].mu["w"].dtype == jnp.bfloat16 and got["w"].dtype == jnp.bfloat16
  assert state[0].v_row["w"].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(got["w"])))
  np.testing.assert_allclose(
      np.asarray(got["w"], np.float32), np.asarray(want["w"], np.float32), atol=0.05
  )
  assert np.abs(np.asarray(got["w"], np.float32) - np.asarray(params["w"], np.float32)).max() > 0.1


def test_beta2_cap_and_offset_follow_their_formula():
  g = jnp.ones((5,), jnp.float32)
  for cap, offset, steps in [(0.5, 0, 6), (None, 4, 3), (None, 2, 6)]:
    tx = optax_rlx.scale_by_adafactor(beta2_cap=cap, decay_offset=offset, epsilon1=0.0,
                                      variance_floor=1e-30)
    state = tx.init(g)
    v = 0.0
    for count in range(steps):
      scale = float(count + 1)
      state = tx.update(g * scale, state)[1]
      t = max(count - offset, 0) + 1
      beta = 1 - t**-0.8
      beta = min(beta, cap) if cap is not None else beta
      v = beta * v + (1 - beta) * scale**2
      assert np.isfinite(np.asarray(state.v)).all()
      np.testing.assert_allclose(np.asarray(state.v), v, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Edge cases: zeros, fp16, non-finite gradients.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_zero_gradients_and_zero_rows_give_finite_updates(dtype):
  params = {"w": jnp.ones((130, 140), dtype), "b": jnp.ones((140,), dtype)}
  zero = jax.tree.map(jnp.zeros_like, params)
  rows = {"w": jnp.zeros((130, 140), dtype).at[:3].set(1e-3), "b": jnp.zeros((140,), dtype)}
  for tx in [optax_rlx.adafactor(), optax_rlx.adafactor(1e-2, **TORCH_CONFIG)]:
    state = tx.init(params)
    for g in [zero, rows, zero]:
      u, state = tx.update(g, state, params)
      for leaf in jax.tree.leaves((u, state)):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    u, _ = tx.update(zero, tx.init(params), params)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u))


@pytest.mark.parametrize("options, scale_free_from", [({}, -6), (TORCH_CONFIG, -2)])
def test_gradients_over_the_float32_range_give_finite_updates_and_state(rng, options,
                                                                         scale_free_from):
  """A factored matrix with a zero row and a zero column (an embedding's unseen tokens), a vector
  and a scalar, scaled by 10^k up to float32's max. Before 2026-12-04 the matrix's update was
  NaN from |g| ~ 1e4 up (the zero row's ratio to the mean row underflowed: 0·∞, then the clip
  spread the NaN), and every leaf's statistics overflowed from 1.8e19 up. Where neither ε₁ (or
  torch's floor) nor the saturation of |g|² (above 8e17 here) acts, the direction does not
  depend on the scale."""
  w = rng.standard_normal((256, 128))
  w[0], w[:, 0] = 0.0, 0.0
  grads = {"w": w, "b": rng.standard_normal(140), "s": np.float64(0.7)}
  top = 0.999 * float(jnp.finfo(jnp.float32).max) / max(np.max(np.abs(x)) for x in grads.values())
  tx = optax_rlx.scale_by_adafactor(**options)
  step = jax.jit(tx.update)

  def updates_at(scale):
    g = {k: jnp.asarray(x * scale, jnp.float32) for k, x in grads.items()}
    state = tx.init(g)
    for _ in range(3):
      u, state = step(g, state)
    for leaf in jax.tree.leaves((u, state)):
      assert bool(jnp.all(jnp.isfinite(leaf))), scale
    return u

  reference = updates_at(1.0)
  for k in [*range(-38, 37, 4), np.log10(top)]:
    u = updates_at(10.0**k)
    if scale_free_from <= k <= 16:
      for name in grads:
        np.testing.assert_allclose(np.asarray(u[name]), np.asarray(reference[name]), rtol=1e-4,
                                   atol=1e-5, err_msg=f"10^{k} {name}")
  zero = {k: jnp.zeros(np.shape(x), jnp.float32) for k, x in grads.items()}
  u, state = step(zero, tx.init(zero))
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def test_fp16_params_keep_float32_statistics_and_finite_updates(rng):
  params = {"w": jnp.asarray(rng.standard_normal((256, 128)), jnp.float16)}
  tx = optax_rlx.adafactor()
  state = tx.init(params)
  assert state[0].v_row["w"].dtype == jnp.float32
  g = {"w": jnp.asarray(rng.standard_normal((256, 128)) * 1e-4, jnp.float16)}
  for _ in range(3):
    u, state = tx.update(g, state, params)
  assert u["w"].dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(u["w"])))
  assert float(jnp.max(jnp.abs(u["w"]))) > 0


def test_non_finite_gradients_behaviour_is_documented_and_apply_if_finite_guards_state():
  params = {"w": jnp.ones((4, 3))}
  bad = {"w": jnp.ones((4, 3)).at[0, 0].set(jnp.nan)}
  tx = optax_rlx.adafactor(1e-2, min_dim_size_to_factor=1)
  u, _ = tx.update(bad, tx.init(params), params)
  assert bool(jnp.any(jnp.isnan(u["w"])))  # not hidden: the step is visibly NaN
  for value in (jnp.inf, -jnp.inf):  # the saturation of huge |g|² leaves infinities alone
    for min_dim in (1, 128):
      tx = optax_rlx.adafactor(1e-2, min_dim_size_to_factor=min_dim)
      u, _ = tx.update({"w": params["w"].at[1, 2].set(value)}, tx.init(params), params)
      assert not bool(jnp.all(jnp.isfinite(u["w"]))), (value, min_dim)
  guarded = optax.apply_if_finite(optax_rlx.adafactor(1e-2, min_dim_size_to_factor=1), 3)
  gstate = guarded.init(params)
  u, gstate = guarded.update(bad, gstate, params)
  assert float(jnp.max(jnp.abs(u["w"]))) == 0.0
  for leaf in jax.tree.leaves(gstate.inner_state):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  assert int(gstate.notfinite_count) == 1


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"decay_rate": -0.8}, "decay_rate"),
        ({"decay_rate": float("inf")}, "decay_rate"),
        ({"decay_offset": -1}, "decay_offset"),
        ({"beta2_cap": 1.5}, "beta2_cap"),
        ({"epsilon1": -1e-30}, "epsilon1"),
        ({"epsilon1": 0.0}, "variance_floor"),
        ({"variance_floor": -1.0}, "variance_floor"),
        ({"epsilon2": -1e-3}, "epsilon2"),
        ({"clipping_threshold": 0.0}, "clipping_threshold"),
        ({"b1": 1.0}, "b1"),
        ({"b1": -0.1}, "b1"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"factoring": "biggest"}, "factoring"),
        ({"factoring": 3}, "factoring"),
        ({"min_dim_size_to_factor": 0}, "min_dim_size_to_factor"),
        ({"min_dim_size_to_factor": 2.5}, "min_dim_size_to_factor"),
        ({"mu_dtype": jnp.int32}, "mu_dtype"),
        ({"multiply_by_parameter_scale": "yes"}, "multiply_by_parameter_scale"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_option(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_rlx.adafactor(**kwargs)


def test_bad_trees_raise_value_error_naming_the_leaf():
  params = {"a": jnp.zeros((200, 130)), "b": jnp.zeros(3)}
  tx = optax_rlx.adafactor()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['b'\].*\(4,\)"):
    tx.update({"a": jnp.zeros((200, 130)), "b": jnp.zeros(4)}, state, params)
  with pytest.raises(ValueError, match=r"\['c'\]"):
    tx.update({"a": jnp.zeros((200, 130)), "c": jnp.zeros(3)}, state, params)
  direction = optax_rlx.scale_by_adafactor()
  with pytest.raises(ValueError, match=r"\['a'\].*\(200, 131\)"):
    direction.update({"a": jnp.zeros((200, 131)), "b": jnp.zeros(3)}, direction.init(params))
  with pytest.raises(ValueError, match=r"\['a'\].*\(130, 200\)"):
    tx.update({"a": jnp.zeros((200, 130)), "b": jnp.zeros(3)}, state,
              {"a": jnp.zeros((130, 200)), "b": jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"\['i'\].*int32"):
    tx.init({"i": jnp.zeros(3, jnp.int32)})
  with pytest.raises(ValueError, match="params"):
    tx.update(jax.tree.map(jnp.zeros_like, params), state)  # parameter scale needs params
  with pytest.raises(ValueError, match=r"factoring rule returned \(0, 0\).*\['w'\]"):
    optax_rlx.scale_by_adafactor(factoring=lambda p, s: (0, 0)).init({"w": jnp.zeros((3, 4))})
  with pytest.raises(ValueError, match="factoring"):
    optax_rlx.scale_by_adafactor(factoring={"w": "nope"}).init({"w": jnp.zeros((3, 4))})


def test_an_unfactored_leaf_of_another_shape_is_not_called_factored():
  params = {"w": jnp.ones((300, 200)), "b": jnp.ones(5)}
  tx = optax_rlx.scale_by_adafactor()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['b'\] has gradient shape \(5, 2\) but the state was "
                                       r"initialised for shape \(5,\)"):
    tx.update({"w": jnp.ones((300, 200)), "b": jnp.ones((5, 2))}, state)
  with pytest.raises(ValueError, match=r"\['w'\] has gradient shape \(300, 201\), which does not "
                                       r"match its factored state"):
    tx.update({"w": jnp.ones((300, 201)), "b": jnp.ones(5)}, state)


def test_bad_trees_are_caught_at_trace_time_under_jit():
  params = {"w": jnp.zeros((3, 4))}
  tx = optax_rlx.adafactor(1e-2)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['w'\]"):
    jax.jit(tx.update)({"w": jnp.zeros((4, 3))}, state, params)


def test_traced_structural_option_gets_a_clear_message():
  tx = optax.inject_hyperparams(optax_rlx.adafactor)(learning_rate=0.1, min_dim_size_to_factor=4)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(tx.init)({"w": jnp.zeros((8, 8))})
  ok = optax.inject_hyperparams(optax_rlx.adafactor, static_args="min_dim_size_to_factor")(
      learning_rate=0.1, min_dim_size_to_factor=4
  )
  assert jax.jit(ok.init)({"w": jnp.zeros((8, 8))}).inner_state[0].v_row["w"].shape == (8, 1)
