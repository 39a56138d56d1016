"""Flax: nnx.Optimizer (partitioning metadata, Newton via split/merge, scanned layers), linen."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_rlx

nnx = pytest.importorskip("flax.nnx")
AUTO = jax.sharding.AxisType.Auto

OPTIMIZERS = {
    "kron": lambda: optax_rlx.kron(1e-2, key=0),
    # Adafactor's step is lr × RMS(param): a larger learning rate for the same progress.
    "adafactor": lambda: optax_rlx.adafactor(0.1, b1=0.9, min_dim_size_to_factor=8),
}


class MLP(nnx.Module):
  def __init__(self, rngs, kernel_init=None, bias_init=None):
    kw = {}
    if kernel_init is not None:
      kw = {"kernel_init": kernel_init, "bias_init": bias_init}
    self.fc1 = nnx.Linear(6, 16, rngs=rngs, **kw)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jnp.tanh(self.fc1(x)))


def _data(n=32):
  x = jax.random.normal(jax.random.key(1), (n, 6))
  return x, jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2], jnp.cos(x[:, 3])], axis=1)


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nnx_optimizer_equals_plain_optax_loop(name):
  """nnx.Optimizer(model, tx) steps == the same tx on the pure param pytree."""
  x, y = _data()
  graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
  model = MLP(nnx.Rngs(0))

  def pure_loss(p):
    return _loss(nnx.merge(graphdef, p, rest), x, y)

  tx = OPTIMIZERS[name]()
  opt_state = tx.init(params)
  optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  @jax.jit
  def plain_step(p, s):
    loss, g = jax.value_and_grad(pure_loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for _ in range(12):
    losses.append(float(nnx_step(model, optimizer)))
    params, opt_state, _ = plain_step(params, opt_state)
  assert losses[-1] < 0.7 * losses[0]
  got = nnx.state(model, nnx.Param)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _partitioned_model_and_optimizer(tx):
  """The Flax recipe for sharded training: nnx.get_partition_spec of (model, optimizer) state."""
  model = MLP(
      nnx.Rngs(0),
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state = nnx.state((model, optimizer))
  nnx.update((model, optimizer),
             jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
  return model, optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nnx_partitioning_metadata(name):
  """Statistics shaped unlike their param drop its annotation; momentum keeps it. (A statistic
  that kept its param's 2-D annotation at another rank would make nnx's sharding fail: optax
  0.2.8's own adafactor does, with a rank error.)"""
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AUTO, AUTO))
  x, y = _data()
  with jax.set_mesh(mesh):
    model, optimizer = nnx.jit(lambda: _partitioned_model_and_optimizer(OPTIMIZERS[name]()))()

    @nnx.jit
    def step(model, optimizer):
      loss, grads = nnx.value_and_grad(_loss)(model, x, y)
      optimizer.update(model, grads)
      return loss

    losses = [float(step(model, optimizer)) for _ in range(10)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  specs = nnx.get_partition_spec(nnx.state(optimizer.opt_state))
  first = specs[0]  # KronState / AdafactorState
  mu = first.mu if name == "kron" else specs[1].mu
  assert mu["fc1"]["kernel"].get_value() == jax.sharding.PartitionSpec("data", "model")


def test_nnx_newton_obj_fn_from_split_merge():
  """criterion='newton' through nnx.Optimizer equals the plain loop, obj_fn via split/merge."""
  x, y = _data()
  make = lambda: optax_rlx.kron(0.3, criterion="newton", key=0)  # noqa: E731
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def obj_fn(params):
      return _loss(nnx.merge(graphdef, params, rest), x, y)

    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads, obj_fn=obj_fn)
    return loss

  reference = MLP(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(reference, nnx.Param, ...)
  obj = lambda p: _loss(nnx.merge(graphdef, p, rest), x, y)  # noqa: E731
  tx = make()
  opt_state = tx.init(params)

  @jax.jit
  def plain_step(p, s):
    u, s = tx.update(jax.grad(obj)(p), s, p, obj_fn=obj)
    return optax.apply_updates(p, u), s

  losses = []
  for _ in range(15):
    losses.append(float(step(model, optimizer)))
    params, opt_state = plain_step(params, opt_state)
  assert losses[-1] < 0.5 * losses[0], losses
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(params),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


class Stack(nnx.Module):
  """Four residual layers created with nnx.vmap and applied with nnx.scan: params (4, d, d)."""

  def __init__(self, rngs, layers=4, d=8):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(d, d, rngs=rngs)

    self.layers = make(rngs)
    self.head = nnx.Linear(d, 1, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, h):
      return h + jnp.tanh(layer(h))

    return self.head(body(self.layers, x))


@pytest.mark.parametrize("name", ["kron", "adafactor"])
def test_nnx_scanned_layers_get_per_layer_state(name):
  def stacked(params):  # a mask, like optax.masked's: which leaves carry a leading layer axis
    return jax.tree.map_with_path(lambda path, _: "layers" in jax.tree_util.keystr(path), params)

  tx = {
      "kron": optax_rlx.kron(1e-2, key=0, stacked_layers=stacked),
      "adafactor": optax_rlx.adafactor(1e-2, min_dim_size_to_factor=4),  # batch axes: per layer
  }[name]
  model = Stack(nnx.Rngs(0))
  assert model.layers.kernel.get_value().shape == (4, 8, 8)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(2), (32, 8))
  y = jnp.sin(x[:, :1])

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(20)]
  assert losses[-1] < 0.8 * losses[0]
  state = nnx.as_pure(optimizer.opt_state)[0]
  if name == "kron":
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    factors = optax_rlx.kron_by_leaf(state.Qs, params, stacked_layers=stacked)["layers"]["kernel"]
    assert [np.shape(q) for q in factors] == [(4, 8, 8), (4, 8, 8)]
    # Each layer's factors moved on their own: they differ from layer to layer.
    q = np.asarray(factors[0])
    assert not np.allclose(q[0], q[1])
  else:
    assert np.shape(state.v_row["layers"]["kernel"]) in [(4, 8, 1), (4, 1, 8)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_linen_train_state(name):
  linen = pytest.importorskip("flax.linen")
  train_state = pytest.importorskip("flax.training.train_state")

  class Net(linen.Module):
    @linen.compact
    def __call__(self, x):
      return linen.Dense(3)(jnp.tanh(linen.Dense(16)(x)))

  x, y = _data()
  net = Net()
  params = net.init(jax.random.key(0), x)["params"]
  state = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=OPTIMIZERS[name]())

  @jax.jit
  def step(state):
    loss_fn = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(15):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  assert int(state.step) == 15
