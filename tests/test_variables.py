"""The NNX adapter (``_variables``): transforms see plain arrays; Variables (duck-typed, here a
stand-in class) come back around the outputs they stand for. ``tests/test_flax.py`` runs the
real ``nnx.Optimizer``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_rlx
from optax_rlx import _variables


@jax.tree_util.register_pytree_node_class
class Variable:
  """Flax NNX's Variable as the adapter sees it: ``get_value`` and ``get_metadata``."""

  def __init__(self, value, metadata=("sharding", ("data", None))):
    self.value, self.metadata = value, metadata

  def get_value(self):
    return self.value

  def get_metadata(self):
    return dict([self.metadata])

  def tree_flatten(self):
    return (self.value,), self.metadata

  @classmethod
  def tree_unflatten(cls, metadata, children):
    return cls(children[0], metadata)


def _recording(seen):
  """A transform that records what it is given and keeps a momentum and a (1,) statistic."""

  def init(params):
    seen.append(("init", params))
    return {"mu": jax.tree.map(jnp.zeros_like, params),
            "stat": jax.tree.map(lambda p: jnp.zeros((1,)), params)}

  def update(updates, state, params=None, obj_fn=None):
    seen.append(("update", updates, state, params))
    if obj_fn is not None:
      seen.append(("obj_fn", obj_fn(params)))
    return jax.tree.map(lambda u: 2 * u, updates), state

  return optax.GradientTransformationExtraArgs(init, update)


def test_plain_arrays_pass_through_untouched():
  seen = []
  tx = _variables.plain_arrays(_recording(seen))
  params = {"w": jnp.ones((2, 3))}
  state = tx.init(params)
  assert seen[0][1] is params and type(state["mu"]["w"]) is not Variable


def test_init_unwraps_and_rewraps_only_params_shaped_state():
  seen = []
  tx = _variables.plain_arrays(_recording(seen))
  params = {"w": Variable(jnp.ones((2, 3))), "b": Variable(jnp.ones(3), ("sharding", ("m",)))}
  state = tx.init(params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(seen[0][1]))
  assert isinstance(state["mu"]["w"], Variable) and state["mu"]["b"].metadata == (
      "sharding", ("m",))
  # A (1,) statistic has not its param's shape: no Variable, no metadata of another rank.
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state["stat"]))


def test_update_unwraps_everything_and_rewraps_updates_state_and_obj_fn():
  seen = []
  tx = _variables.plain_arrays(_recording(seen))
  wrap = lambda tree: jax.tree.map(Variable, tree)  # noqa: E731
  params = wrap({"w": jnp.ones((2, 3))})
  state = {"mu": wrap({"w": jnp.zeros((2, 3))}), "stat": {"w": jnp.zeros((1,))}}

  def obj_fn(p):
    assert isinstance(p["w"], Variable)  # called with the params as the user passed them
    return jnp.sum(p["w"].get_value())

  updates, new_state = tx.update(wrap({"w": jnp.ones((2, 3))}), state, params, obj_fn=obj_fn)
  _, got_updates, got_state, got_params = seen[0]
  for tree in (got_updates, got_state, got_params):
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree))
  assert float(seen[1][1]) == 6.0
  assert isinstance(updates["w"], Variable)
  np.testing.assert_array_equal(np.asarray(updates["w"].get_value()), 2 * np.ones((2, 3)))
  assert isinstance(new_state["mu"]["w"], Variable)


def test_optax_rlx_transforms_go_through_the_adapter():
  params = {"w": Variable(jnp.ones((6, 4))), "b": Variable(jnp.ones(4))}
  kron_state = optax_rlx.scale_by_kron().init(params)
  assert isinstance(kron_state.mu["w"], Variable)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(kron_state.Qs))
  ada_state = optax_rlx.scale_by_adafactor(min_dim_size_to_factor=2).init(params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(ada_state.v_row))
  assert isinstance(ada_state.v["b"], Variable)
