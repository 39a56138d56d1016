"""optax_rlx: curvature-aware optimizers for JAX/Optax.

Every optimizer is a pure functional ``optax.GradientTransformation``: a ``scale_by_*``
transform returning a descent direction, and an alias that adds the step size.
"""

from optax_rlx._adafactor import (
    AdafactorState,
    AdafactorStepState,
    adafactor,
    relative_step_schedule,
    scale_by_adafactor,
)
from optax_rlx._kron import KronState, fill_masked, kron, kron_by_leaf, scale_by_kron
from optax_rlx._kron_options import KronOptions, precond_update_prob_schedule
from optax_rlx._sharding import state_sharding

__version__ = "0.1.0.dev0"

__all__ = [
    "AdafactorState",
    "AdafactorStepState",
    "KronOptions",
    "KronState",
    "adafactor",
    "fill_masked",
    "kron",
    "kron_by_leaf",
    "precond_update_prob_schedule",
    "relative_step_schedule",
    "scale_by_adafactor",
    "scale_by_kron",
    "state_sharding",
]
