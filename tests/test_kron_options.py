"""Kron's options (``_kron_options``): declared once, with their defaults in every signature and
their meaning in every docstring, validated by name."""

import inspect
import re
import typing

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_rlx
from optax_rlx import _kron_options

OPTIONS = list(typing.get_type_hints(optax_rlx.KronOptions))


@pytest.mark.parametrize("function, own", [
    (optax_rlx.scale_by_kron, []),
    (optax_rlx.kron, ["learning_rate", "weight_decay", "weight_decay_mask"]),
    (optax_rlx.kron_by_leaf, ["groups", "params"]),
])
def test_signatures_list_every_option_keyword_only_with_its_default(function, own):
  parameters = inspect.signature(function).parameters
  assert list(parameters) == own + OPTIONS
  for name in OPTIONS:
    parameter = parameters[name]
    assert parameter.kind == inspect.Parameter.KEYWORD_ONLY
    assert parameter.default is _kron_options.DEFAULTS[name]
  assert parameters["geometry"].annotation == typing.Literal["procrustes", "triangular", "quad"]
  assert parameters["precond_update_prob"].default == optax_rlx.precond_update_prob_schedule()
  assert parameters["cache_precond"].default is False and parameters["b1"].default == 0.9


def test_learning_rate_is_annotated_as_optax_expects_and_the_rest_keyword_only():
  parameters = inspect.signature(optax_rlx.kron).parameters
  assert parameters["learning_rate"].annotation == optax.ScalarOrSchedule
  assert parameters["learning_rate"].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
  with pytest.raises(TypeError):
    optax_rlx.kron(1e-3, 0.9)  # b1 is keyword-only


def _documented(docstring):
  """The argument names of a Google-style docstring's ``Args:`` section, in order."""
  section = docstring[docstring.index("  Args:\n"):docstring.index("\n\n  Returns:")]
  return re.findall(r"^    (\w+):", section, flags=re.MULTILINE)


def test_every_option_is_documented_in_both_docstrings_in_signature_order():
  assert _documented(optax_rlx.scale_by_kron.__doc__) == OPTIONS
  assert _documented(optax_rlx.kron.__doc__) == [
      "learning_rate", "weight_decay", "weight_decay_mask", *OPTIONS]
  assert "see :func:`scale_by_kron`" not in optax_rlx.kron.__doc__


def test_a_misspelt_option_is_a_type_error_naming_it():
  with pytest.raises(TypeError, match="kron\\(\\) got an unexpected keyword argument 'geometri'"):
    optax_rlx.kron(1e-3, geometri="triangular")
  with pytest.raises(TypeError, match="'precond_learning_rate'"):
    optax_rlx.scale_by_kron(precond_learning_rate=0.1)


@pytest.mark.parametrize("name, value", [("geometry", "procrutes"), ("criterion", "fisher"),
                                         ("precond_fit_on", "params"),
                                         ("memory_save_mode", "some_diag")])
def test_an_unknown_choice_names_the_option_and_its_choices(name, value):
  with pytest.raises(ValueError, match=f"unknown `{name}` '{value}'; expected one of"):
    optax_rlx.kron(1e-3, **{name: value})


def test_inject_hyperparams_injects_the_numbers_and_keeps_the_shapes_static():
  """Every number in the signature becomes a hyperparameter in the state; the numbers that
  decide shapes default to None and stay out of it."""
  params = {"w": jnp.ones((6, 4)), "b": jnp.ones(4)}
  tx = optax.inject_hyperparams(optax_rlx.kron)(learning_rate=1e-2)
  state = tx.init(params)
  assert {"learning_rate", "b1", "precond_lr", "damping", "lipschitz_decay", "update_clip",
          "precond_update_prob", "key"} <= set(state.hyperparams)
  assert not {"max_size_dense", "max_skew_dense", "dense_budget", "group_multiple",
              "min_ndim_dense"} & set(state.hyperparams)
  updates, state = jax.jit(tx.update)(params, state, params)
  assert float(state.hyperparams["precond_update_prob"]) == 1.0  # the schedule's flat start
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_the_config_keeps_the_options_by_their_own_names():
  cfg = _kron_options.make_config({"group_axes": "data", "max_skew_dense": 3.0})
  assert set(cfg.options) == set(OPTIONS)
  assert cfg.options["group_axes"] == ("data",)
  assert cfg.options["precond_update_prob"] == optax_rlx.precond_update_prob_schedule()
  assert cfg.structure.max_skew_dense == 3.0 and cfg.structure.max_size_dense == 8192
  assert cfg.geometry.name == "procrustes" and cfg.fit.damping == 1e-9
  assert cfg.group_multiple == 1 and cfg.uses_momentum and not cfg.refits_every_step
  assert _kron_options.make_config({"precond_update_prob": 1.0}).refits_every_step


def test_the_default_refit_schedule_is_a_value_with_a_readable_repr():
  schedule = optax_rlx.precond_update_prob_schedule()
  assert repr(schedule) == ("UpdateProbSchedule(max_prob=1.0, min_prob=0.03, decay=0.001, "
                            "flat_start=200)")
  assert schedule == optax_rlx.precond_update_prob_schedule(1.0, 0.03, 0.001, 200)
  assert float(schedule(0)) == 1.0 and float(schedule(199)) == 1.0 and float(schedule(300)) < 0.91
  assert abs(float(schedule(20_000)) - 0.03) < 1e-7
  with pytest.raises(ValueError, match="min_prob"):
    optax_rlx.precond_update_prob_schedule(max_prob=0.5, min_prob=0.6)
