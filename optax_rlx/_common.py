"""Shared validation and tree helpers for optax_rlx transforms.

Every check here runs in Python at construction, ``init`` or trace time, so bad
input fails with a :class:`ValueError` that names the option or the leaf path,
never with a NaN or an error from deep inside XLA.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def is_traced(value: Any) -> bool:
  """Whether ``value`` is an abstract JAX value (e.g. injected by ``inject_hyperparams``)."""
  return isinstance(value, jax.core.Tracer)


def _concrete_float(value: Any) -> float | None:
  """Returns ``value`` as a Python float when it is a concrete real scalar, else ``None``."""
  if isinstance(value, bool) or value is None or callable(value) or is_traced(value):
    return None
  if isinstance(value, (int, float, np.integer, np.floating)):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)) and np.shape(value) == ():
    if jnp.issubdtype(value.dtype, jnp.complexfloating):
      return None
    return float(value)
  return None


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    allow_schedule: bool = False,
    allow_inf: bool = False,
) -> None:
  """Raises ``ValueError`` unless ``value`` is a finite number in the given range.

  Traced values (as injected by ``optax.inject_hyperparams`` under ``jit``) and,
  when ``allow_schedule``, callables cannot be checked here and are accepted.

  Args:
    owner: the public function the option belongs to, for the message.
    name: the option's keyword name.
    value: the value given.
    low: lower bound, or ``None``.
    high: upper bound, or ``None``.
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.
    allow_none: whether ``None`` is a valid value.
    allow_schedule: whether a callable (an optax schedule) is a valid value.
    allow_inf: whether +inf is a valid value.
  """
  if value is None:
    if allow_none:
      return
    raise ValueError(f"{owner}: `{name}` must be a number, got None.")
  if callable(value):
    if allow_schedule:
      return
    raise ValueError(f"{owner}: `{name}` must be a number, not a callable ({value!r}).")
  if is_traced(value):
    return
  number = _concrete_float(value)
  if number is None:
    raise ValueError(f"{owner}: `{name}` must be a real scalar number, got {value!r}.")
  if not math.isfinite(number) and not (allow_inf and number == math.inf):
    raise ValueError(f"{owner}: `{name}` must be finite, got {value!r}.")
  if low is not None and (number < low or (low_open and number == low)):
    sign = ">" if low_open else ">="
    raise ValueError(f"{owner}: `{name}` must be {sign} {low}, got {value!r}.")
  if high is not None and (number > high or (high_open and number == high)):
    sign = "<" if high_open else "<="
    raise ValueError(f"{owner}: `{name}` must be {sign} {high}, got {value!r}.")


def static_int(owner: str, name: str, value: Any, *, low: int) -> int:
  """Returns ``value`` as a Python ``int`` >= ``low``; it decides shapes, so it must be static."""
  if is_traced(value):
    raise ValueError(
        f"{owner}: `{name}` decides the optimizer state's shapes and must be a static Python "
        f"int, got a traced value. With `optax.inject_hyperparams`, pass "
        f"`static_args=('{name}',)`."
    )
  if isinstance(value, bool) or value is None:
    raise ValueError(f"{owner}: `{name}` must be an int, got {value!r}.")
  if isinstance(value, (np.ndarray, jax.Array)):
    if np.shape(value) != () or not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f"{owner}: `{name}` must be an int, got {value!r}.")
    value = int(value)
  if not isinstance(value, (int, np.integer)):
    raise ValueError(f"{owner}: `{name}` must be an int, got {value!r}.")
  if value < low:
    raise ValueError(f"{owner}: `{name}` must be >= {low}, got {value!r}.")
  return int(value)


def check_bool(owner: str, name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is a bool."""
  if not isinstance(value, bool | np.bool_):
    raise ValueError(f"{owner}: `{name}` must be a bool, got {value!r}.")


def check_float_dtype(owner: str, name: str, dtype: Any) -> None:
  """Raises ``ValueError`` unless ``dtype`` is None or names a floating dtype."""
  if dtype is None:
    return
  try:
    kind = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"{owner}: `{name}` {dtype!r} is not a dtype.") from e
  if not jnp.issubdtype(kind, jnp.floating):
    raise ValueError(f"{owner}: `{name}` must be a floating dtype, got {kind.name}.")


def padded_spec(spec: Any, ndim: int) -> tuple[Any, ...]:
  """A PartitionSpec's entries, one per axis (a spec may name fewer axes than the array has)."""
  entries = tuple(spec)
  return entries + (None,) * (ndim - len(entries))


def spec_along_param(entries: tuple[Any, ...], shape: tuple[int, ...],
                     param_shape: tuple[int, ...]) -> tuple[Any, ...] | None:
  """Spec entries for an array laid out along a param's axes (same rank): the param's entry on
  axes of equal size, None on the others; None when the ranks differ."""
  if len(shape) != len(param_shape):
    return None
  return tuple(e if a == b else None for e, a, b in zip(entries, shape, param_shape, strict=True))


def explicit_spec(x: Any) -> tuple[Any, ...] | None:
  """``x``'s PartitionSpec entries (one per axis) under an explicit-axes mesh, else None.

  Under ``jax.sharding.AxisType.Explicit`` the sharding is part of the type, so an optimizer's
  ``init`` can see it even on tracers and give its state the matching layout; under Auto meshes
  use :func:`optax_rlx.state_sharding` with ``jax.jit(..., out_shardings=...)`` instead.
  """
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None
  spec = getattr(sharding, "spec", None)
  if spec is None or all(e is None for e in spec):
    return None
  return padded_spec(spec, len(x.shape))


def divisible_axes(size: int, axes: Sequence[str], axis_sizes: Mapping[str, int]) -> tuple:
  """``axes`` in order, each kept while the product of the kept axes' sizes divides ``size``:
  the mesh axes an axis of length ``size`` can be sharded over evenly."""
  kept, product = [], 1
  for name in axes:
    if size % (product * axis_sizes[name]) == 0:
      kept.append(name)
      product *= axis_sizes[name]
  return tuple(kept)


def group_spec(size: int, ndim: int, group_axes: tuple | None, mesh: Any,
               owner: str = "kron") -> jax.sharding.PartitionSpec:
  """The spec of a factor-group array (leading axis of length ``size``) on ``mesh``: sharded
  over ``group_axes`` (None: every mesh axis) as far as their sizes divide ``size``."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
  axes = tuple(mesh.axis_names) if group_axes is None else group_axes
  for name in axes:
    if name not in sizes:
      raise ValueError(
          f"{owner}: `group_axes` names mesh axis {name!r}, but the mesh has axes "
          f"{tuple(mesh.axis_names)}."
      )
  return lead_spec(divisible_axes(size, axes, sizes), ndim)


def lead_spec(axes: tuple, ndim: int) -> jax.sharding.PartitionSpec:
  """A spec sharding only the leading axis, over ``axes`` (replicated when empty)."""
  if not axes or not ndim:
    return jax.sharding.PartitionSpec()
  first = axes[0] if len(axes) == 1 else axes
  return jax.sharding.PartitionSpec(first, *([None] * (ndim - 1)))


def layout_like(x: jax.Array, param: Any) -> jax.Array:
  """``x`` resharded like ``param`` under an explicit-axes mesh; ``x`` itself otherwise.

  Axes of ``x`` with the same size as the param's keep its sharding (when the ranks agree),
  others are replicated.
  """
  entries = explicit_spec(param)
  shape = tuple(x.shape)
  if entries is None or not shape:
    return x
  spec = spec_along_param(entries, shape, tuple(param.shape))
  if spec is None or all(e is None for e in spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec))


def zeros_like_layout(shape: tuple[int, ...], dtype: Any, param: Any) -> jax.Array:
  """``jnp.zeros(shape, dtype)`` laid out like ``param`` (see :func:`layout_like`)."""
  return layout_like(jnp.zeros(shape, dtype), param)


def as_tuple(node: Any) -> tuple[Any, ...]:
  """A tuple stored in optimizer state, as a tuple. Containers that rebuild pytrees
  (``flax.nnx.Optimizer`` keeps optimizer state as ``nnx.State``) can hand it back as a mapping
  ``{0: x_0, 1: x_1, ...}``."""
  if isinstance(node, Mapping):
    return tuple(node[k] for k in sorted(node))
  return tuple(node)


def momentum_like(params: Any, mu_dtype: Any) -> Any:
  """Zeros shaped (and, under explicit meshes, sharded) like ``params`` in ``mu_dtype`` (its
  complex counterpart for complex params)."""
  return jax.tree.map(
      lambda p: zeros_like_layout(
          p.shape, p.dtype if mu_dtype is None else like_param_dtype(mu_dtype, p.dtype), p
      ),
      params,
  )


def is_zero(value: Any) -> bool:
  """Whether ``value`` is a Python number equal to zero, so the work it scales can be skipped.

  Arrays never count, even concrete ones: ``optax.inject_hyperparams`` passes a concrete array
  to ``init`` and a traced one to ``update``, and both must build the same state structure.
  """
  return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def path_str(path: Sequence[Any]) -> str:
  """A readable name for a pytree key path, e.g. ``['layer']['w']``; ``<root>`` for a bare leaf."""
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def _leaf_paths(tree: Any) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(owner: str, ref: Any, ref_name: str, other: Any, other_name: str) -> None:
  """Raises ``ValueError`` when two pytrees differ in structure, naming the differing leaves."""
  ref_def = jax.tree_util.tree_structure(ref)
  other_def = jax.tree_util.tree_structure(other)
  if ref_def == other_def:
    return
  ref_paths, other_paths = _leaf_paths(ref), _leaf_paths(other)
  missing = [p for p in ref_paths if p not in set(other_paths)]
  extra = [p for p in other_paths if p not in set(ref_paths)]
  detail = []
  if missing:
    detail.append(f"leaves missing from {other_name}: {', '.join(missing[:5])}")
  if extra:
    detail.append(f"unexpected leaves in {other_name}: {', '.join(extra[:5])}")
  if not detail:
    detail.append(f"{ref_name} has structure {ref_def}, {other_name} has {other_def}")
  raise ValueError(
      f"{owner}: the structure of {other_name} does not match {ref_name} ({'; '.join(detail)})."
  )


def check_same_shapes(owner: str, ref: Any, ref_name: str, other: Any, other_name: str) -> None:
  """Raises ``ValueError`` when two pytrees differ in structure or in any leaf's shape."""
  check_same_structure(owner, ref, ref_name, other, other_name)
  ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
  for (path, a), b in zip(ref_leaves, jax.tree.leaves(other), strict=True):
    if np.shape(a) != np.shape(b):
      raise ValueError(
          f"{owner}: leaf {path_str(path)} has shape {tuple(np.shape(b))} in {other_name} but "
          f"{tuple(np.shape(a))} in {ref_name}."
      )


def check_inexact_leaves(owner: str, tree: Any, tree_name: str) -> None:
  """Raises ``ValueError`` unless every leaf has a real floating or complex dtype
  (``ShapeDtypeStruct`` ok)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
      raise ValueError(
          f"{owner}: leaf {path_str(path)} of {tree_name} is {type(leaf).__name__}, expected an "
          f"array or jax.ShapeDtypeStruct."
      )
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(
          f"{owner}: leaf {path_str(path)} of {tree_name} has dtype {jnp.dtype(dtype).name}; "
          f"only floating-point and complex leaves are supported."
      )


def is_complex(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.complexfloating)


def real_dtype(dtype: Any) -> jnp.dtype:
  """The real dtype of a complex one (complex64 → float32); a real dtype itself."""
  return jnp.finfo(dtype).dtype if is_complex(dtype) else jnp.dtype(dtype)


def complex_dtype(dtype: Any) -> jnp.dtype:
  """The complex counterpart of a floating dtype: float64 → complex128, any other → complex64
  (there is no complex bfloat16 or float16)."""
  if is_complex(dtype):
    return jnp.dtype(dtype)
  return jnp.dtype(jnp.complex128 if jnp.dtype(dtype) == jnp.float64 else jnp.complex64)


def like_param_dtype(dtype: Any, param_dtype: Any) -> jnp.dtype:
  """``dtype`` for a buffer of a ``param_dtype`` param: its complex counterpart for complex
  params (a real ``mu_dtype`` names the precision of a complex momentum)."""
  return complex_dtype(dtype) if is_complex(param_dtype) else jnp.dtype(dtype)


def abs2(x: jax.Array) -> jax.Array:
  """``|x|²`` elementwise, real: ``x * x`` for real ``x``."""
  if jnp.iscomplexobj(x):
    return jnp.square(x.real) + jnp.square(x.imag)
  return x * x


def stats_dtype(dtype: Any) -> jnp.dtype:
  """Dtype for optimizer statistics: float32, or the param dtype when it is wider (complex64 for
  complex64 params)."""
  return jnp.promote_types(dtype, jnp.float32)


def real_stats_dtype(dtype: Any) -> jnp.dtype:
  """Dtype for real statistics of a param (``|g|²``, norms): float32 or float64."""
  return real_dtype(stats_dtype(dtype))


def schedule_value(value: Any, count: jax.Array) -> Any:
  """Evaluates an optax ``ScalarOrSchedule`` at ``count``."""
  return value(count) if callable(value) else value


def resolve_mask(mask: Any, params: Any) -> Any:
  """Turns a mask (bool, pytree prefix of ``params`` or callable of ``params``) into a full tree."""
  if callable(mask):
    mask = mask(params)
  return jax.tree.map(
      lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, params,
      is_leaf=lambda x: isinstance(x, bool),
  )


def decoupled_weight_decay(weight_decay: Any, mask: Any,
                           owner: str) -> optax.GradientTransformation:
  """``optax.add_decayed_weights(weight_decay, mask)`` with the same state at every value.

  At a Python 0 the step is skipped (and needs no params), but the state is still the one
  ``add_decayed_weights`` builds, so an alias's state has one structure whether ``weight_decay``
  is 0, another number, or traced by ``optax.inject_hyperparams``. The updates keep their dtype
  (optax's would take float64 params' precision for float32 gradients). Without ``params`` the
  step raises a ``ValueError`` naming ``owner`` and ``weight_decay``.
  """
  decay = optax.add_decayed_weights(weight_decay, mask)
  if not is_zero(weight_decay):

    def update(updates, state, params=None):
      if params is None:
        raise ValueError(
            f"{owner}: weight_decay={weight_decay!r} needs the params: pass them to "
            f"`update(updates, state, params)`."
        )
      out, state = decay.update(updates, state, params)
      return jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates), state

    return optax.GradientTransformation(decay.init, update)

  def skip(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    del params
    return updates, state

  return optax.GradientTransformation(decay.init, skip)


def args_section(docstring: str) -> str:
  """The entries of a Google-style docstring's ``Args:`` section, as written (an alias's
  docstring takes its transform's this way)."""
  start = docstring.index("  Args:\n") + len("  Args:\n")
  return docstring[start:docstring.index("\n\n", start)].strip()
