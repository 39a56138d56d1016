"""Fixed-seed runs reproduce the arrays recorded in ``tests/data/pinned_runs.npz``.

The record was made before Kron and Adafactor were split into plan / numerics / transform
modules; a refactor must leave every number unchanged. XLA's CPU code depends on the versions and
the processor, so the comparison is bit for bit on the recording fingerprint and to float32
round-off elsewhere.
"""

import numpy as np
import pinned_runs
import pytest


@pytest.fixture(scope="module")
def record():
  with np.load(pinned_runs.DATA) as data:
    return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", sorted(pinned_runs.CASES))
def test_run_matches_record(name, record):
  got = pinned_runs.run(name)
  expected = {k.split("|", 1)[1]: v for k, v in record.items() if k.startswith(name + "|")}
  assert sorted(got) == sorted(expected)
  exact = str(record["__fingerprint__"]) == pinned_runs.fingerprint()
  for path, want in expected.items():
    if want.dtype.kind == "V":  # NumPy stores bfloat16 as raw 2-byte records
      assert want.dtype.itemsize == got[path].dtype.itemsize, path
      want = want.view(got[path].dtype)
    assert got[path].dtype == want.dtype, path
    assert got[path].shape == want.shape, path
    if exact:
      np.testing.assert_array_equal(got[path], want, err_msg=f"{name} {path}")
    else:
      np.testing.assert_allclose(got[path].astype(np.float64), want.astype(np.float64),
                                 rtol=2e-3, atol=1e-5, err_msg=f"{name} {path}")
