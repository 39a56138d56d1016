"""Kron's options: validated once into a frozen :class:`KronConfig`, and the refit schedule."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_rlx import _common
from optax_rlx._kron_numerics import FitOptions
from optax_rlx._kron_plan import MEMORY_SAVE_MODES, StructureRule

OWNER = "kron"
CRITERIA = ("whitening", "newton")
GEOMETRIES = ("triangular", "procrustes")
FIT_ON = ("momentum", "gradient")
DEFAULT_MAX_SIZE_DENSE = 8192
DEFAULT_MIN_NDIM_DENSE = 2
DEFAULT_MAX_SKEW_DENSE = 2.0
DEFAULT_DENSE_BUDGET = 1.0


def precond_update_prob_schedule(
    max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001, flat_start: int = 500
) -> optax.Schedule:
  """Probability of refitting the preconditioner: flat at ``max_prob``, then exponential decay.

  ``p(t) = clip(max_prob * exp(-decay * (t - flat_start)), min_prob, max_prob)``: with the
  defaults, 1 for 500 steps, then decaying to 0.03 by about step 4000.

  Args:
    max_prob: probability during the flat start.
    min_prob: floor reached after the decay.
    decay: exponential decay rate per step after ``flat_start``.
    flat_start: number of steps at ``max_prob``.

  Returns:
    An optax schedule of the step count.

  Example:
    >>> import optax_rlx
    >>> p = optax_rlx.precond_update_prob_schedule()
    >>> print(f"{p(0):.2f} {p(500):.2f} {p(1500):.3f} {p(10_000):.2f}")
    1.00 1.00 0.368 0.03
  """
  check = _common.check_number
  owner = "precond_update_prob_schedule"
  check(owner, "max_prob", max_prob, low=0.0, high=1.0, low_open=True)
  check(owner, "min_prob", min_prob, low=0.0, high=max_prob, low_open=True)
  check(owner, "decay", decay, low=0.0)
  check(owner, "flat_start", flat_start, low=0.0)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    return jnp.clip(max_prob * jnp.exp(-decay * (t - flat_start)), min_prob, max_prob)

  return schedule


@dataclasses.dataclass(frozen=True)
class KronConfig:
  """Every option of ``scale_by_kron``, validated (see its docstring for their meaning).

  Numbers may be traced (``optax.inject_hyperparams``); everything deciding shapes is static.
  """

  b1: Any
  nesterov: bool
  precond_lr: Any
  update_prob: Any  # float or schedule; None resolved to precond_update_prob_schedule()
  init_scale: Any  # precond_init_scale; None: automatic (fit.auto_init)
  criterion: str
  fit_on: str
  structure: StructureRule
  fit: FitOptions
  update_clip: Any
  mu_dtype: Any
  precond_dtype: Any
  stacked_layers: Any
  group_multiple: int
  group_axes: tuple[str, ...] | None
  cache_precond: bool  # resolved: None means False
  key_data: Any  # raw uint32 key data (NumPy when concrete)

  @property
  def use_momentum(self) -> bool:
    """``b1=None`` turns momentum off; any number, 0 included, keeps the buffer (so the state's
    structure does not depend on the value, as ``optax.inject_hyperparams`` needs)."""
    return self.b1 is not None

  @property
  def refits_every_step(self) -> bool:
    """A static probability of 1: the refit runs unconditionally (no ``lax.cond``)."""
    return _always_refits(self.update_prob)

  def factor_dtype(self, param_dtype, dense: bool) -> jnp.dtype:
    """Dense factors of complex params are complex (``precond_dtype`` names their precision);
    diagonal factors are always real."""
    if self.precond_dtype is not None:
      dtype = _common.like_param_dtype(self.precond_dtype, param_dtype)
    else:
      dtype = _common.stats_dtype(param_dtype)
    return dtype if dense else _common.real_dtype(dtype)


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{OWNER}: unknown `{name}` {value!r}; expected one of {choices}.")


def _key_data(key):
  if isinstance(key, int | np.integer) and not isinstance(key, bool):
    return jax.random.key_data(jax.random.key(int(key)))
  if _common.is_traced(key) and jnp.issubdtype(key.dtype, jnp.integer) and key.ndim == 0:
    return jax.random.key_data(jax.random.key(key))
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


def as_key_data(key):
  """``key`` as raw uint32 key data; concrete keys become NumPy (no device or mesh attached, so a
  transformation built under one mesh works under another)."""
  data = _key_data(key)
  return data if _common.is_traced(data) else np.asarray(data)


def _check_numbers(options):
  check = _common.check_number
  check(OWNER, "b1", options["b1"], low=0.0, high=1.0, high_open=True, allow_none=True)
  check(OWNER, "precond_lr", options["precond_lr"], low=0.0, low_open=True, allow_schedule=True)
  check(OWNER, "precond_update_prob", options["precond_update_prob"], low=0.0, high=1.0,
        low_open=True, allow_none=True, allow_schedule=True)
  check(OWNER, "precond_init_scale", options["precond_init_scale"], low=0.0, low_open=True,
        allow_none=True)
  check(OWNER, "damping", options["damping"], low=0.0)
  check(OWNER, "lipschitz_decay", options["lipschitz_decay"], low=0.0, high=1.0, high_open=True)
  check(OWNER, "update_clip", options["update_clip"], low=0.0, low_open=True, allow_none=True)
  check(OWNER, "max_skew_dense", options["max_skew_dense"], low=0.0, low_open=True,
        allow_none=True, allow_inf=True)
  check(OWNER, "dense_budget", options["dense_budget"], low=0.0, allow_none=True,
        allow_inf=True)


def _group_axes(value):
  if value is None:
    return None
  axes = (value,) if isinstance(value, str) else value
  if not isinstance(axes, tuple | list) or not axes or not all(isinstance(a, str) for a in axes):
    raise ValueError(
        f"{OWNER}: `group_axes` must be None, a mesh axis name or a tuple of names; got "
        f"{value!r}."
    )
  return tuple(axes)


def _static_int_or(name, value, default, low):
  return default if value is None else _common.static_int(OWNER, name, value, low=low)


def _static_float(options, name, default):
  value = options[name]
  if value is None:
    return default
  if _common.is_traced(value):
    raise ValueError(
        f"{OWNER}: `{name}` decides the state's shapes and must be static; with "
        f"`optax.inject_hyperparams`, pass `static_args=('{name}',)`."
    )
  return float(value)


def _structure_rule(options) -> StructureRule:
  return StructureRule(
      max_size_dense=_static_int_or("max_size_dense", options["max_size_dense"],
                                    DEFAULT_MAX_SIZE_DENSE, low=1),
      min_ndim_dense=_static_int_or("min_ndim_dense", options["min_ndim_dense"],
                                    DEFAULT_MIN_NDIM_DENSE, low=0),
      max_skew_dense=_static_float(options, "max_skew_dense", DEFAULT_MAX_SKEW_DENSE),
      memory_save_mode=options["memory_save_mode"],
      block_size=_static_int_or("block_size", options["block_size"], None, low=1),
      dense_budget=_static_float(options, "dense_budget", DEFAULT_DENSE_BUDGET),
  )


def _always_refits(update_prob) -> bool:
  """A static refit probability of at least 1 (not a schedule or a traced value)."""
  return isinstance(update_prob, int | float) and update_prob >= 1.0


def make_config(**options) -> KronConfig:
  """Validates ``scale_by_kron``'s keyword arguments into a :class:`KronConfig`.

  Raises:
    ValueError: an option out of range, of the wrong type, or an unknown choice; the message
      names the option.
  """
  _check_numbers(options)
  _check_choice("criterion", options["criterion"], CRITERIA)
  _check_choice("geometry", options["geometry"], GEOMETRIES)
  _check_choice("precond_fit_on", options["precond_fit_on"], FIT_ON)
  _check_choice("memory_save_mode", options["memory_save_mode"], MEMORY_SAVE_MODES)
  _common.check_bool(OWNER, "nesterov", options["nesterov"])
  structure = _structure_rule(options)
  _common.check_float_dtype(OWNER, "mu_dtype", options["mu_dtype"])
  _common.check_float_dtype(OWNER, "precond_dtype", options["precond_dtype"])
  key_data = as_key_data(options["key"])
  prob = options["precond_update_prob"]
  update_prob = precond_update_prob_schedule() if prob is None else prob
  cache = options["cache_precond"]
  if cache is None:  # off: its memory goes to dense factors instead (``dense_budget``)
    cache = False
  else:
    _common.check_bool(OWNER, "cache_precond", cache)
  return KronConfig(
      b1=options["b1"],
      nesterov=options["nesterov"],
      precond_lr=options["precond_lr"],
      update_prob=update_prob,
      init_scale=options["precond_init_scale"],
      criterion=options["criterion"],
      fit_on=options["precond_fit_on"],
      structure=structure,
      fit=FitOptions(
          geometry=options["geometry"],
          damping=options["damping"],
          lipschitz_decay=options["lipschitz_decay"],
          auto_init=options["precond_init_scale"] is None,
      ),
      update_clip=options["update_clip"],
      mu_dtype=options["mu_dtype"],
      precond_dtype=options["precond_dtype"],
      stacked_layers=options["stacked_layers"],
      group_multiple=_static_int_or("group_multiple", options["group_multiple"], 1, low=1),
      group_axes=_group_axes(options["group_axes"]),
      cache_precond=bool(cache),
      key_data=key_data,
  )
