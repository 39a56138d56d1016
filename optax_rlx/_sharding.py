"""Shardings for optimizer states: :func:`state_sharding`."""

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from optax_rlx import _common
from optax_rlx._kron_state import KronState, has_cache

_OWNER = "state_sharding"


def _like_param(leaf: Any, param: Any, sharding: NamedSharding, mesh: Any) -> NamedSharding:
  """A state leaf laid out along its param's axes takes the param's spec on axes of equal size.

  Axes whose size differs from the param's (an Adafactor statistic's reduced axis, a ``(1,)``
  placeholder) are replicated; a leaf of another rank is replicated.
  """
  entries = _common.padded_spec(sharding.spec, len(param.shape))
  spec = _common.spec_along_param(entries, tuple(leaf.shape), tuple(param.shape))
  if spec is None:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def state_sharding(tx: optax.GradientTransformation, params: Any,
                   param_shardings: Any = None) -> Any:
  r"""Shardings of ``tx.init(params)`` for params sharded by ``param_shardings``.

  Use the result as ``out_shardings`` of ``jax.jit(tx.init)`` and as the state's
  ``in_shardings``/``out_shardings`` of a jitted train step, so the state is created sharded and
  keeps its sharding from step to step. The rules:

  - **Params-like subtrees** (any part of the state with the params' tree structure: Adam's
    moments, momentum, ``MultiSteps``' accumulators, Adafactor's ``v``, ``v_row``, ``v_col``,
    Kron's ``mu``; masked-out leaves of ``optax.masked`` are skipped) take, leaf by leaf, the
    param's ``PartitionSpec`` on every axis whose size equals the param's and are replicated on
    the others. An Adafactor row statistic of a ``(rows, cols)`` param sharded
    ``P('data', 'model')`` is ``(rows, 1)`` and gets ``P('data', None)``: it keeps the sharding of
    the axis it runs along and drops the reduced one.
  - **Kron factors** (``Qs``), their Lipschitz estimates (``Ls``) and cached preconditioner
    factors (``Ps``) are stored by *factor group*: every fitting unit (a leaf, a layer of a
    stacked leaf, a block) with the same factor shapes and dtypes sits in one array with a
    leading group axis. That axis is sharded over Kron's ``group_axes`` option (default: every
    axis of the params' mesh, in order), keeping each axis only while the product of the kept
    axes' sizes divides the group's size; so each device stores and refits its share of every
    group, and a group too small to divide (e.g. a single embedding) is replicated. Pad groups
    with ``kron(..., group_multiple=n)`` to shard them evenly over ``n`` devices. Units are
    ordered by leaf, then layer and block, so a stacked leaf's layers (or a blocked leaf's row
    blocks) sharded like the param stay on the devices holding them. Kron's ``init`` lays the
    groups out so under an explicit-axes mesh; this function reads that layout off
    ``jax.eval_shape(tx.init)`` on the params placed on an explicit-axes copy of their mesh.
  - Everything else (counters, PRNG keys, injected hyperparameters, refit accumulators) is
    replicated.

  Args:
    tx: any optax transformation (optax_rlx's or optax's, chains, wrappers).
    params: the params (arrays or ``jax.ShapeDtypeStruct``\ s); only shapes and dtypes are used.
    param_shardings: a pytree like ``params`` of ``jax.sharding.NamedSharding``; ``None`` takes
      each param's own ``.sharding`` (sharded arrays, or ``ShapeDtypeStruct``\ s with one).

  Returns:
    A pytree like ``tx.init(params)`` of ``NamedSharding``\ s.

  Raises:
    ValueError: ``param_shardings`` does not match ``params``, or has no ``NamedSharding``, or
      Kron's ``group_axes`` names an axis the mesh lacks.

  Example:
    >>> import jax, jax.numpy as jnp, optax_rlx
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> params = {"w": jnp.zeros((256, 128)), "b": jnp.zeros(128)}
    >>> shardings = {"w": NamedSharding(mesh, P("data", None)), "b": NamedSharding(mesh, P())}
    >>> tx = optax_rlx.adafactor(1e-2)
    >>> state_shardings = optax_rlx.state_sharding(tx, params, shardings)
    >>> state = jax.eval_shape(tx.init, params)[0]  # w: rows along axis 1, columns along axis 0
    >>> state.v_row["w"].shape, state_shardings[0].v_row["w"].spec
    ((1, 128), P(None, None))
    >>> state.v_col["w"].shape, state_shardings[0].v_col["w"].spec
    ((256, 1), P('data', None))
    >>> state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  """
  if param_shardings is None:
    param_shardings = jax.tree.map(lambda p: getattr(p, "sharding", None), params)
  param_leaves, param_def = jax.tree.flatten(params)
  try:
    sharding_leaves = param_def.flatten_up_to(param_shardings)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{_OWNER}: `param_shardings` must have the params' structure {param_def}; got "
        f"{jax.tree.structure(param_shardings)}."
    ) from e
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for path, s, p in zip(paths, sharding_leaves, param_leaves, strict=True):
    if not isinstance(s, NamedSharding):
      raise ValueError(
          f"{_OWNER}: param {path} with shape {tuple(p.shape)} has sharding {s!r}; expected a "
          f"jax.sharding.NamedSharding (pass `param_shardings`)."
      )
  if not sharding_leaves:
    return jax.tree.map(lambda _: None, jax.eval_shape(tx.init, params))
  mesh = sharding_leaves[0].mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract = jax.eval_shape(tx.init, params)

  def params_like(node: Any) -> Any:
    leaves, treedef = jax.tree.flatten(node, is_leaf=_is_masked)
    if treedef != param_def:
      return None
    out = [
        leaf if _is_masked(leaf) else _like_param(leaf, p, s, mesh)
        for leaf, p, s in zip(leaves, param_leaves, sharding_leaves, strict=True)
    ]
    return treedef.unflatten(out)

  def on_mesh(placed: Any) -> NamedSharding:
    # A group array's sharding on the explicit mesh, on the params' mesh.
    spec = placed.sharding.spec if placed.sharding else PartitionSpec()
    return replicated if all(e is None for e in spec) else NamedSharding(mesh, spec)

  def kron(state: KronState, placed: KronState) -> Any:  # a KronState of shardings
    groups = jax.tree.map(on_mesh, (placed.Qs, placed.Ls, placed.Ps if has_cache(placed) else ()))
    shardings: Any = state
    return shardings._replace(count=replicated, key=replicated, precond_acc=replicated,
                              mu=assign(state.mu, state.mu), Qs=groups[0], Ls=groups[1],
                              Ps=groups[2])

  def assign(node: Any, placed: Any) -> Any:
    """Shardings of ``node``; ``placed`` is the same part of the explicitly placed state."""
    if isinstance(node, KronState):
      return kron(node, placed)
    if _is_masked(node):
      return node
    aligned = params_like(node)
    if aligned is not None:
      return aligned
    children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # an array leaf
      return replicated
    placed_children = treedef.flatten_up_to(placed)
    return treedef.unflatten([assign(c, p) for c, p in zip(children, placed_children,
                                                            strict=True)])

  return assign(abstract, _explicitly_placed(tx, params, sharding_leaves, param_def))


def _explicitly_placed(tx: optax.GradientTransformation, params: Any,
                       shardings: list[NamedSharding], param_def: Any) -> Any:
  """``jax.eval_shape(tx.init)`` on the params placed on an explicit-axes copy of their mesh,
  where the state's abstract arrays carry the shardings ``init`` gives them."""
  mesh = shardings[0].mesh
  explicit = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                               axis_types=(jax.sharding.AxisType.Explicit,) * len(mesh.axis_names))
  placed = param_def.unflatten([
      jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=NamedSharding(explicit, s.spec))
      for p, s in zip(jax.tree.leaves(params), shardings, strict=True)
  ])
  with jax.set_mesh(explicit):
    return jax.eval_shape(tx.init, placed)
