"""Kron's state: its layout per leaf (from the static plans), its initial value and its checks."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_rlx import _common
from optax_rlx import _kron_plan as planning
from optax_rlx._kron_config import OWNER, KronConfig


class KronState(NamedTuple):
  """State of :func:`scale_by_kron`.

  For a leaf of shape ``(d_1, ..., d_r)`` the preconditioner is ``P = Qᵀ Q`` with
  ``Q = Q_1 ⊗ ... ⊗ Q_r``: ``Q_i`` is a dense ``(d_i, d_i)`` matrix (upper triangular, or
  symmetric positive definite with ``geometry='procrustes'``) or a diagonal stored as ``(d_i,)``.
  Scalars have one factor of shape ``(1,)``. A stacked leaf (``stacked_layers``) of shape
  ``(n, d_1, ..., d_r)`` has factors with a leading ``n`` axis. For a complex leaf ``P = Qᴴ Q``:
  dense factors are complex (Hermitian positive definite with ``'procrustes'``), diagonal
  factors real and positive.

  Attributes:
    count: int32 scalar, number of updates so far.
    key: uint32 PRNG key data (``jax.random.key_data``), split every step.
    precond_acc: float32 scalar, running sum of refit probabilities; a refit happens whenever it
      reaches 1 (a deterministic realisation of ``precond_update_prob``).
    mu: pytree like the params, momentum in ``mu_dtype``; ``()`` without momentum.
    Qs: pytree with the params' structure whose leaves are tuples of factors in ``precond_dtype``.
    Ls: like ``Qs`` with float32 scalars (``(n,)`` when stacked): each factor's Lipschitz
      estimate normalising its fitting step.
  """

  count: jax.Array
  key: jax.Array
  precond_acc: jax.Array
  mu: optax.Updates
  Qs: Any
  Ls: Any



def leaf_plans(tree, cfg: KronConfig) -> list[planning.LeafPlan]:
  """One plan per leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if cfg.stacked_layers is None:
    stacked = [False] * len(leaves)
  else:
    stacked = jax.tree.leaves(_common.resolve_mask(cfg.stacked_layers, tree))
  return [
      planning.make_plan(tuple(x.shape), bool(s), cfg.structure, _common.path_str(path))
      for (path, x), s in zip(leaves, stacked, strict=True)
  ]


def _init_leaf(param, plan, cfg: KronConfig):
  """Factors ``s^(1/r) I`` (dense) or ``s^(1/r) 1`` (diagonal), zero Lipschitz estimates."""
  scale = 1.0 if cfg.init_scale is None else cfg.init_scale
  per_factor = jnp.asarray(scale, jnp.float32) ** (1.0 / len(plan.block_shape))
  factors = tuple(
      (per_factor * (jnp.eye(d) if is_dense else jnp.ones(d))).astype(
          cfg.factor_dtype(param.dtype, is_dense))
      for d, is_dense in zip(plan.block_shape, plan.dense, strict=True)
  )
  lips = tuple(jnp.zeros([], jnp.float32) for _ in plan.block_shape)
  if not plan.batched:
    return factors, lips
  # One set of factors per layer and block. A layer's factors live with that layer: under an
  # explicit-axes mesh they take the param's sharding of the layer axis (see state_sharding for
  # Auto meshes); blocks' factors are replicated.
  n = plan.lead[0]
  lay_out = (
      functools.partial(_common.layout_like, param=param, lead=True)
      if plan.stacked and not plan.blocked else lambda x: x
  )
  factors = tuple(lay_out(jnp.broadcast_to(q, (n, *q.shape))) for q in factors)
  lips = tuple(lay_out(jnp.zeros((n,), jnp.float32)) for _ in lips)
  return factors, lips


def init_state(params, cfg: KronConfig) -> KronState:
  _common.check_inexact_leaves(OWNER, params, "params")
  mu = _common.momentum_like(params, cfg.mu_dtype) if cfg.use_momentum else ()
  params, _ = _common.split_variables(params)  # factors never take a param's NNX metadata
  treedef = jax.tree.structure(params)
  per_leaf = [
      _init_leaf(p, plan, cfg)
      for p, plan in zip(jax.tree.leaves(params), leaf_plans(params, cfg), strict=True)
  ]
  return KronState(
      count=jnp.zeros([], jnp.int32),
      key=jnp.asarray(cfg.key_data),
      precond_acc=jnp.ones([], jnp.float32),
      mu=mu,
      Qs=treedef.unflatten([factors for factors, _ in per_leaf]),
      Ls=treedef.unflatten([lips for _, lips in per_leaf]),
  )



def check_inputs(updates, state, params, obj_fn, cfg: KronConfig):
  """Raises ``ValueError`` for a foreign state, mismatched trees or shapes, or missing Newton
  inputs; returns the leaves' plans and the updates' treedef."""
  if not isinstance(state, KronState):
    raise ValueError(f"{OWNER}: expected a KronState, got {type(state).__name__}.")
  _common.check_inexact_leaves(OWNER, updates, "the updates")
  treedef = jax.tree.structure(updates)
  try:
    qs = [_common.as_tuple(f) for f in treedef.flatten_up_to(state.Qs)]
  except (ValueError, TypeError):
    _common.check_same_structure(
        OWNER, jax.tree.map(lambda _: 0, state.Qs, is_leaf=lambda x: isinstance(x, tuple)),
        "the optimizer state", updates, "the updates",
    )
    raise
  if params is not None:
    _common.check_same_shapes(OWNER, params, "the params", updates, "the updates")
  plans = leaf_plans(updates, cfg)
  for (path, _), plan, factors in zip(
      jax.tree_util.tree_flatten_with_path(updates)[0], plans, qs, strict=True
  ):
    planning.check_factor_shapes(plan, tuple(tuple(q.shape) for q in factors),
                                 _common.path_str(path))
  if cfg.criterion == "newton":
    if obj_fn is None:
      raise ValueError(
          f"{OWNER}: criterion='newton' needs `obj_fn` (params -> scalar loss) passed to "
          f"`update(grads, state, params, obj_fn=...)`."
      )
    if params is None:
      raise ValueError(f"{OWNER}: criterion='newton' needs `params` passed to `update`.")
  return plans, treedef
