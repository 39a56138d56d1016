"""Kron's options, declared once in :class:`KronOptions`, and validated into a :class:`KronConfig`.

``KronOptions`` lists every keyword option of ``scale_by_kron`` and ``kron`` with its type and
default. Both functions take ``**options: Unpack[KronOptions]`` (what type checkers read) and get
their runtime signature from it (:func:`takes_options`; what ``inspect.signature``, Sphinx and
``optax.inject_hyperparams`` read). So adding an option is three edits: its line here, its entry
in ``scale_by_kron``'s docstring, and its use.
"""

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, NamedTuple, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike

from optax_rlx import _common
from optax_rlx._kron_geometry import GEOMETRIES, FitOptions, Geometry
from optax_rlx._kron_plan import StructureRule

OWNER = "kron"

Criterion = Literal["whitening", "newton"]
GeometryName = Literal["procrustes", "triangular", "quad"]
FitTarget = Literal["momentum", "gradient"]
MemorySaveMode = Literal["one_diag", "all_diag"]


@dataclasses.dataclass(frozen=True)
class Default:
  """The default of a :class:`KronOptions` entry (``Annotated`` metadata)."""

  value: Any


@dataclasses.dataclass(frozen=True)
class UpdateProbSchedule:
  """``p(t) = clip(max_prob · exp(-decay · (t - flat_start)), min_prob, max_prob)``: see
  :func:`precond_update_prob_schedule`. A frozen dataclass, so it compares equal by value and
  shows its numbers in ``scale_by_kron``'s signature."""

  max_prob: float = 1.0
  min_prob: float = 0.03
  decay: float = 0.001
  flat_start: int = 200

  def __call__(self, count: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.asarray(count, jnp.float32)
    return jnp.clip(self.max_prob * jnp.exp(-self.decay * (t - self.flat_start)),
                    self.min_prob, self.max_prob)


class KronOptions(TypedDict, total=False):
  """Every keyword option of :func:`~optax_rlx.scale_by_kron` and :func:`~optax_rlx.kron`.

  Each entry is ``name: Annotated[type, Default(value)]``; the meanings are in
  ``scale_by_kron``'s docstring. Type checkers read ``**options: Unpack[KronOptions]``.

  The options that decide the state's shapes and are numbers (``max_size_dense``,
  ``min_ndim_dense``, ``max_skew_dense``, ``dense_budget``, ``group_multiple``) default to None,
  which means the value documented: ``optax.inject_hyperparams`` turns every number in a
  signature into a traced hyperparameter, and a traced shape cannot be planned.
  """

  b1: Annotated[float | None, Default(0.9)]
  nesterov: Annotated[bool, Default(False)]
  precond_lr: Annotated[optax.ScalarOrSchedule, Default(0.1)]
  precond_update_prob: Annotated[optax.ScalarOrSchedule, Default(UpdateProbSchedule())]
  precond_init_scale: Annotated[float | None, Default(None)]
  criterion: Annotated[Criterion, Default("whitening")]
  geometry: Annotated[GeometryName, Default("procrustes")]
  precond_fit_on: Annotated[FitTarget, Default("momentum")]
  max_size_dense: Annotated[int | None, Default(None)]
  min_ndim_dense: Annotated[int | None, Default(None)]
  max_skew_dense: Annotated[float | None, Default(None)]
  dense_budget: Annotated[float | None, Default(None)]
  memory_save_mode: Annotated[MemorySaveMode | None, Default(None)]
  block_size: Annotated[int | None, Default(None)]
  damping: Annotated[float, Default(1e-9)]
  lipschitz_decay: Annotated[float, Default(0.9)]
  update_clip: Annotated[float | None, Default(1.1)]
  mu_dtype: Annotated[DTypeLike | None, Default(None)]
  precond_dtype: Annotated[DTypeLike | None, Default(None)]
  stacked_layers: Annotated[Any, Default(None)]
  group_multiple: Annotated[int | None, Default(None)]
  group_axes: Annotated[str | tuple[str, ...] | None, Default(None)]
  cache_precond: Annotated[bool, Default(False)]
  key: Annotated[int | jax.Array, Default(0)]


# What None means for the shape-deciding numbers (see KronOptions).
STRUCTURE_DEFAULTS = {"max_size_dense": 8192, "min_ndim_dense": 2, "max_skew_dense": 2.0,
                      "dense_budget": 1.0, "group_multiple": 1}


class KronConfig(NamedTuple):
  """The validated options and what is derived from them once.

  Attributes:
    options: every option (defaults filled in; ``group_axes`` as a tuple or None). Numbers may
      be traced (``optax.inject_hyperparams``); everything deciding shapes is static.
    structure: the options deciding which factors are dense, for :mod:`._kron_plan`.
    fit: how a fitting unit steps: the geometry's definition, damping, Lipschitz decay.
    key_data: the ``key`` option as raw uint32 key data (NumPy when concrete).
  """

  options: KronOptions
  structure: StructureRule
  fit: FitOptions
  key_data: Any

  @property
  def geometry(self) -> Geometry:
    return self.fit.geometry

  @property
  def group_multiple(self) -> int:
    multiple = self.options["group_multiple"]
    return int(STRUCTURE_DEFAULTS["group_multiple"]) if multiple is None else multiple

  @property
  def uses_momentum(self) -> bool:
    """``b1=None`` turns momentum off; any number, 0 included, keeps the buffer (so the state's
    structure does not depend on the value, as ``optax.inject_hyperparams`` needs)."""
    return self.options["b1"] is not None

  @property
  def refits_every_step(self) -> bool:
    """A static refit probability of at least 1: the refit runs unconditionally (no cond)."""
    prob = self.options["precond_update_prob"]
    return isinstance(prob, int | float) and prob >= 1.0


def precond_update_prob_schedule(
    max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001, flat_start: int = 200
) -> optax.Schedule:
  """Probability of refitting the preconditioner: flat at ``max_prob``, then exponential decay.

  ``p(t) = clip(max_prob * exp(-decay * (t - flat_start)), min_prob, max_prob)``: with the
  defaults, 1 for 200 steps, then decaying to 0.03 by about step 3700. The default of
  ``precond_update_prob``: chosen by seconds to AdamW's final loss on ``compare.py``'s seven
  problems (``benchmarks/kron_defaults.py --study refit``, 2026-12-05), where a flat start of 200
  was level with or ahead of psgd_jax's 500 on each; final losses were level or lower but on
  two problems already far below their targets (Rosenbrock 5e-11 against 3e-11, the digits
  MLP 4e-7 against 2e-7).

  Args:
    max_prob: probability during the flat start.
    min_prob: floor reached after the decay.
    decay: exponential decay rate per step after ``flat_start``.
    flat_start: number of steps at ``max_prob``.

  Returns:
    An optax schedule of the step count (a frozen dataclass: equal schedules compare equal,
    and its repr shows its numbers).

  Example:
    >>> import optax_rlx
    >>> p = optax_rlx.precond_update_prob_schedule()
    >>> print(f"{p(0):.2f} {p(200):.2f} {p(1200):.3f} {p(10_000):.2f}")
    1.00 1.00 0.368 0.03
  """
  check = _common.check_number
  owner = "precond_update_prob_schedule"
  check(owner, "max_prob", max_prob, low=0.0, high=1.0, low_open=True)
  check(owner, "min_prob", min_prob, low=0.0, high=max_prob, low_open=True)
  check(owner, "decay", decay, low=0.0)
  check(owner, "flat_start", flat_start, low=0.0)
  return UpdateProbSchedule(max_prob, min_prob, decay, flat_start)


def make_config(options: Mapping[str, Any], function: str = OWNER) -> KronConfig:
  """Validates the keyword ``options`` given to ``function`` (the rest take their defaults).

  Raises:
    TypeError: an option this function does not take (as Python raises for a misspelt keyword).
    ValueError: an option out of range, of the wrong type, or an unknown choice; the message
      names the option.
  """
  unknown = sorted(set(options) - set(DEFAULTS))
  if unknown:
    raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
  resolved = typing.cast(KronOptions, {**DEFAULTS, **options})
  _check_numbers(resolved)
  _check_declared_kinds(resolved)
  resolved["group_axes"] = _group_axes(resolved["group_axes"])
  fit = FitOptions(geometry=GEOMETRIES[resolved["geometry"]], damping=resolved["damping"],
                   lipschitz_decay=resolved["lipschitz_decay"])
  return KronConfig(options=resolved, structure=_structure_rule(resolved), fit=fit,
                    key_data=as_key_data(resolved["key"]))


_Function = typing.TypeVar("_Function", bound=Callable[..., Any])


def takes_options(function: _Function) -> _Function:
  """Gives ``function`` (whose last parameter is ``**options: Unpack[KronOptions]``) the
  signature of its own parameters followed by every option, keyword-only, with its default."""
  own = list(inspect.signature(function).parameters.values())[:-1]
  signature = inspect.signature(function).replace(parameters=own + _PARAMETERS)
  function.__signature__ = signature  # type: ignore[attr-defined]
  return function


def _declared() -> dict[str, tuple[Any, Any]]:
  """``{option: (type, default)}`` from :class:`KronOptions`, in declaration order."""
  hints = typing.get_type_hints(KronOptions, include_extras=True)
  out = {}
  for name, hint in hints.items():
    kind, *metadata = typing.get_args(hint)
    out[name] = (kind, next(m.value for m in metadata if isinstance(m, Default)))
  return out


DEFAULTS: dict[str, Any] = {name: default for name, (_, default) in _declared().items()}
_PARAMETERS = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=kind)
               for name, (kind, default) in _declared().items()]


def _check_numbers(options: Mapping[str, Any]) -> None:
  check = functools.partial(_common.check_number, OWNER)
  check("b1", options["b1"], low=0.0, high=1.0, high_open=True, allow_none=True)
  check("precond_lr", options["precond_lr"], low=0.0, low_open=True, allow_schedule=True)
  check("precond_update_prob", options["precond_update_prob"], low=0.0, high=1.0,
        low_open=True, allow_schedule=True)
  check("precond_init_scale", options["precond_init_scale"], low=0.0, low_open=True,
        allow_none=True)
  check("damping", options["damping"], low=0.0)
  check("lipschitz_decay", options["lipschitz_decay"], low=0.0, high=1.0, high_open=True)
  check("update_clip", options["update_clip"], low=0.0, low_open=True, allow_none=True)


def _check_declared_kinds(options: Mapping[str, Any]) -> None:
  """The checks a declared type implies: a ``Literal`` option is one of its choices, a bool is a
  bool, a dtype a floating dtype."""
  for name, (kind, _) in _declared().items():
    value = options[name]
    choices = _choices(kind)
    if choices is not None and value not in choices:
      raise ValueError(f"{OWNER}: unknown `{name}` {value!r}; expected one of {choices}.")
    if kind is bool:
      _common.check_bool(OWNER, name, value)
    if kind == DTypeLike | None:
      _common.check_float_dtype(OWNER, name, value)


def _choices(kind: Any) -> tuple | None:
  """The values a ``Literal`` (or ``Literal | None``) type allows; None for other types."""
  if typing.get_origin(kind) is Literal:
    return typing.get_args(kind)
  union = typing.get_origin(kind) in (typing.Union, types.UnionType)
  parts = typing.get_args(kind) if union else ()
  literals = [p for p in parts if typing.get_origin(p) is Literal]
  if not literals:
    return None
  none = (None,) if type(None) in parts else ()
  return none + tuple(v for p in literals for v in typing.get_args(p))


def _structure_rule(options: Mapping[str, Any]) -> StructureRule:
  def static_int(name, low):
    value = options[name]
    return STRUCTURE_DEFAULTS[name] if value is None else _common.static_int(OWNER, name, value,
                                                                             low=low)

  def static_float(name):
    value = options[name]
    _common.check_number(OWNER, name, value, low=0.0, low_open=name == "max_skew_dense",
                         allow_none=True, allow_inf=True)
    if value is None:
      return STRUCTURE_DEFAULTS[name]
    if _common.is_traced(value):
      raise ValueError(
          f"{OWNER}: `{name}` decides the state's shapes and must be static; with "
          f"`optax.inject_hyperparams`, pass `static_args=('{name}',)`."
      )
    return float(value)

  static_int("group_multiple", low=1)  # checked here; KronConfig.group_multiple reads it
  block_size = options["block_size"]
  return StructureRule(
      max_size_dense=static_int("max_size_dense", low=1),
      min_ndim_dense=static_int("min_ndim_dense", low=0),
      max_skew_dense=static_float("max_skew_dense"),
      memory_save_mode=options["memory_save_mode"],
      block_size=None if block_size is None else _common.static_int(OWNER, "block_size",
                                                                    block_size, low=1),
      dense_budget=static_float("dense_budget"),
  )


def _group_axes(value: Any) -> tuple[str, ...] | None:
  if value is None:
    return None
  axes = (value,) if isinstance(value, str) else value
  if not isinstance(axes, tuple | list) or not axes or not all(isinstance(a, str) for a in axes):
    raise ValueError(
        f"{OWNER}: `group_axes` must be None, a mesh axis name or a tuple of names; got "
        f"{value!r}."
    )
  return tuple(axes)


def as_key_data(key: Any) -> Any:
  """``key`` as raw uint32 key data; concrete keys become NumPy (no device or mesh attached, so a
  transformation built under one mesh works under another)."""
  data = _key_data(key)
  return data if _common.is_traced(data) else np.asarray(data)


def _key_data(key: Any) -> Any:
  if isinstance(key, int | np.integer) and not isinstance(key, bool):
    return jax.random.key_data(jax.random.key(int(key)))
  if isinstance(key, jax.Array | np.ndarray):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(key)
    if jnp.issubdtype(key.dtype, jnp.integer) and key.ndim == 0:
      return jax.random.key_data(jax.random.key(key))
    if key.dtype == jnp.uint32 and key.ndim == 1:
      return jnp.asarray(key)
  raise ValueError(
      f"{OWNER}: `key` must be an int or a JAX PRNG key (typed or raw uint32), got {key!r}."
  )

