"""Test-only start-up hook for `tourguide` subprocesses in the concurrency tests: with
TOURGUIDE_TEST_BARRIER=<folder> (and this folder first on PYTHONPATH), the capture's first commit
waits until TOURGUIDE_TEST_PARTIES processes have arrived, so two writers race for real.

Python imports `sitecustomize` at start-up; we hook the import of lib.capture.run and wrap its
commit_shards there. Nothing of this ships: it lives under tests/ and needs both the env var and
this folder on PYTHONPATH.
"""

import os
import time
from pathlib import Path


def wait_barrier(folder: Path, parties: int, timeout: float = 180) -> None:
    """Wait until `parties` processes have arrived (one file each in `folder`); the worker
    processes of tests/reliability/workers.py use it too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{os.getpid()}.ready").touch()
    deadline = time.time() + timeout
    while len(list(folder.glob("*.ready"))) < parties:
        if time.time() > deadline:
            raise TimeoutError(f"barrier {folder}: {parties} processes did not arrive in {timeout} s")
        time.sleep(0.01)


if os.environ.get("TOURGUIDE_TEST_BARRIER"):
    import importlib.abc
    import sys

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "lib.capture.run":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader = spec.loader
            original_exec = loader.exec_module

            def exec_module(module):
                original_exec(module)
                commit, state = module.commit_shards, {"waited": False}

                def commit_after_barrier(*args, **kwargs):
                    if not state["waited"]:
                        state["waited"] = True
                        wait_barrier(Path(os.environ["TOURGUIDE_TEST_BARRIER"]),
                              int(os.environ.get("TOURGUIDE_TEST_PARTIES", "2")))
                    return commit(*args, **kwargs)

                module.commit_shards = commit_after_barrier

            loader.exec_module = exec_module
            return spec

    import importlib.util

    sys.meta_path.insert(0, _Hook())
