"""Several processes, as users run them when they outgrow one machine: two processes of 4 CPU
devices each on 127.0.0.1 (``jax.distributed`` with gloo CPU collectives) run a sharded train
step of kron and adafactor equal to the unsharded one, and save and restore the sharded state
with Orbax across the processes (``tests/multiprocess_worker.py``)."""

import os
import pathlib
import socket
import subprocess
import sys

import xla_test_flags

HERE = pathlib.Path(__file__).resolve().parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device_and_share_a_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  xla_test_flags.apply(env)
  port = str(_free_port())
  workers = [
      subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), port, str(i),
                        str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
      for i in range(2)
  ]
  try:
    outputs = [w.communicate(timeout=400) for w in workers]
  finally:
    for w in workers:
      w.kill()
  for w, (out, err) in zip(workers, outputs, strict=True):
    assert w.returncode == 0, err[-3000:]
    # gloo logs its connections to stdout too; the worker's own lines start with "ok".
    assert [line for line in out.splitlines() if line.startswith("ok ")] == [
        "ok kron", "ok adafactor"], out
