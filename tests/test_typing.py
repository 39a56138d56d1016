"""What type-checking users see: the package ships ``py.typed``, a typed user script passes mypy
against it, and misspelt options are caught before anything runs (mypy reads ``kron``'s options
from ``KronOptions`` and their ``Literal`` choices). ``.ci/run`` also checks ``optax_rlx/``
itself (``mypy``, configured in pyproject.toml)."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

import optax_rlx

# optax 0.2.8 ships no py.typed: a user silences it as they would in their own project.
MYPY_CONFIG = "[mypy]\n[mypy-optax.*]\nignore_missing_imports = True\n"

TYPED_SCRIPT = """
import jax.numpy as jnp
import optax

import optax_rlx

params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
kron = optax_rlx.kron(optax.cosine_decay_schedule(1e-3, 100), geometry="triangular", b1=0.9,
                      precond_dtype="bfloat16", weight_decay=1e-4, memory_save_mode="one_diag")
tx = optax.chain(optax.clip_by_global_norm(1.0), kron)
state = tx.init(params)
ada = optax_rlx.adafactor(None, factoring="last_two", b1=0.9, min_dim_size_to_factor=2)
direction = optax_rlx.scale_by_kron(criterion="newton", max_skew_dense=3.0, block_size=1024)
shardings = optax_rlx.state_sharding(ada, params, None)
"""

MISSPELT = {
    'optax_rlx.kron(1e-3, geometry="procrutes")': "geometry",
    "optax_rlx.kron(1e-3, max_skew_dens=2.0)": "max_skew_dens",
    'optax_rlx.scale_by_kron(criterion="newtons")': "criterion",
    'optax_rlx.adafactor(1e-3, factoring="largest_three")': "factoring",
}


def _mypy(tmp_path: pathlib.Path, source: str) -> subprocess.CompletedProcess:
  (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
  (tmp_path / "user.py").write_text(textwrap.dedent(source))
  return subprocess.run(
      [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", ".mypy_cache",
       "user.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_the_package_is_marked_typed():
  assert (pathlib.Path(optax_rlx.__file__).parent / "py.typed").is_file()


def test_a_typed_user_script_passes_and_misspelt_options_fail(tmp_path):
  pytest.importorskip("mypy")
  ok = _mypy(tmp_path, TYPED_SCRIPT)
  assert ok.returncode == 0, ok.stdout
  bad = _mypy(tmp_path, "import optax_rlx\n" + "\n".join(MISSPELT))
  assert bad.returncode == 1, bad.stdout
  for line, (call, option) in enumerate(MISSPELT.items(), start=2):
    errors = [e for e in bad.stdout.splitlines() if e.startswith(f"user.py:{line}: error")]
    assert errors and option in errors[0], (call, bad.stdout)
