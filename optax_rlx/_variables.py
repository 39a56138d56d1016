"""Flax NNX Variables at the edge of a transform: the one place optax_rlx handles them.

``flax.nnx.Optimizer`` calls ``tx.init`` on a tree of ``nnx.Param`` Variables and copies each
Variable's metadata (e.g. its sharding names) to the state leaves built in its place; a
statistic whose shape differs from its param's (an Adafactor row statistic, a placeholder, a
Kron factor) must not inherit it, or nnx shards it with the param's (wrong-rank) annotation.
:func:`plain_arrays` wraps a transform so that it only ever sees plain arrays. optax_rlx does not
import flax: a Variable is recognised by its ``get_value`` and ``get_metadata`` methods.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax


def plain_arrays(
    tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  """``tx`` on plain arrays: NNX Variables in its inputs are unwrapped, and put back around the
  outputs they stand for.

  ``init``: every part of the state shaped like the params (a momentum, Adafactor's
  statistics) takes, leaf by leaf, its param's Variable where the shapes agree. ``update``: the
  updates come back in the updates' Variables, the state in the state's, and an ``obj_fn``
  extra argument is called with the params as they were passed. For plain arrays (optax, Flax
  linen, Equinox) the wrapper changes nothing.
  """

  def init_fn(params: Any) -> Any:
    pure, rewrap = split_variables(params)
    state = tx.init(pure)
    if pure is params:
      return state
    return _map_params_like(rewrap, state, jax.tree.structure(pure))

  def update_fn(updates: Any, state: Any, params: Any = None,
                **extra_args: Any) -> tuple[Any, Any]:
    updates, rewrap_updates = split_variables(updates)
    state, rewrap_state = split_variables(state)
    if params is not None:
      params, rewrap_params = split_variables(params)
      obj_fn = extra_args.get("obj_fn")
      if obj_fn is not None:
        extra_args["obj_fn"] = lambda p: obj_fn(rewrap_params(p))
    out, new_state = tx.update(updates, state, params, **extra_args)
    return rewrap_updates(out), rewrap_state(new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def split_variables(tree: Any) -> tuple[Any, Any]:
  """``(pure, rewrap)``: ``tree`` with NNX Variables replaced by their values, and a function.

  ``rewrap(other)`` puts each leaf of a pure tree shaped like ``tree`` back in the Variable it
  stands for, where the shapes agree. For a tree without Variables, ``pure`` is ``tree`` itself
  and ``rewrap`` the identity.
  """
  if not any(_is_variable(x) for x in jax.tree.leaves(tree, is_leaf=_is_variable)):
    return tree, lambda other: other
  pure = jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, tree,
                      is_leaf=_is_variable)

  def rewrap(other):
    def wrap(original, leaf):
      if _is_variable(original) and tuple(leaf.shape) == tuple(original.get_value().shape):
        return jax.tree.unflatten(jax.tree.structure(original), [leaf])
      return leaf

    return jax.tree.map(wrap, tree, other, is_leaf=_is_variable)

  return pure, rewrap


def _map_params_like(fn: Callable[[Any], Any], node: Any, params_def: Any) -> Any:
  """``node`` with ``fn`` applied to every subtree whose structure is ``params_def``."""
  if jax.tree.structure(node) == params_def:
    return fn(node)
  children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
  if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # a leaf
    return node
  return treedef.unflatten([_map_params_like(fn, c, params_def) for c in children])


def _is_variable(x: Any) -> bool:
  """A Flax NNX ``Variable`` (duck-typed: optax_rlx does not import flax)."""
  return (
      not isinstance(x, jax.Array | np.ndarray)
      and callable(getattr(x, "get_metadata", None))
      and callable(getattr(x, "get_value", None))
  )
