"""What the tests need from JAX that its oldest supported release spells differently.

The dependency floors (``pyproject.toml``; ``.ci/run`` installs them and runs a smoke subset)
predate ``jax.enable_x64``: there it is ``jax.experimental.enable_x64``.
"""

import jax

if hasattr(jax, "enable_x64"):
  enable_x64 = jax.enable_x64
else:  # jax < 0.8
  from jax.experimental import enable_x64  # noqa: F401
