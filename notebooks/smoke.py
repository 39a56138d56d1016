"""Executes every notebook in this folder top to bottom (smoke mode), as CI does.

Usage: ``python notebooks/smoke.py [--save] [NOTEBOOK ...]``. Each notebook runs in a fresh
Jupyter kernel (nbclient) with ``NUM_STEPS`` set to a small value (default 30; override with the
``NUM_STEPS`` environment variable) and ``MPLBACKEND=Agg``, so plots render off-screen. Exits
non-zero when a cell raises. Needs the ``test`` extra (nbclient, ipykernel, matplotlib, flax).

``--save`` runs the notebooks at their own (full) length instead and writes the outputs back into
the ``.ipynb`` files: the documentation renders those saved outputs and never executes a notebook.
"""

import os
import pathlib
import sys
import time

import nbclient
import nbformat


def main(argv):
  save = "--save" in argv
  argv = [a for a in argv if a != "--save"]
  here = pathlib.Path(__file__).resolve().parent
  paths = [pathlib.Path(p) for p in argv] or sorted(here.glob("*.ipynb"))
  if save:  # full length, and plots as inline images in the saved outputs
    os.environ.pop("NUM_STEPS", None)
    os.environ.pop("MPLBACKEND", None)
  else:
    os.environ.setdefault("NUM_STEPS", "30")
    os.environ["MPLBACKEND"] = "Agg"
  failed = []
  for path in paths:
    start = time.perf_counter()
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
      client.execute()
      status = "ok"
    except nbclient.exceptions.CellExecutionError as error:
      status = "FAILED"
      failed.append((path.name, error))
    if save and status == "ok":
      nbformat.write(notebook, path)
    steps = os.environ.get("NUM_STEPS", "the notebook's default")
    print(f"{path.name}: {status} in {time.perf_counter() - start:.1f} s (NUM_STEPS={steps})",
          flush=True)
  for name, error in failed:
    print(f"\n--- {name} ---\n{error}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
