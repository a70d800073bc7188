"""Test-only start-up hook for the workers' flow-run processes in tests/scale: with
TOURGUIDE_TEST_SECTIONS=<folder> (and this folder first on PYTHONPATH), every call of
lib.capture.run.capture_items (the body of a capture batch, which tasks.capture runs inside the
`gpu` slot) appends {pid, start, end, out} to <folder>/sections.jsonl, after sleeping for the
seconds in <folder>/sleep when that file exists (so that sections are long enough to overlap).

Nothing of this ships: it lives under tests/ and needs both the env var and this folder on
PYTHONPATH (the workers of tests/scale/conftest.py get both).
"""

import os

if os.environ.get("TOURGUIDE_TEST_SECTIONS"):
    import importlib.abc
    import importlib.util
    import json
    import sys
    import time
    from pathlib import Path

    _FOLDER = Path(os.environ["TOURGUIDE_TEST_SECTIONS"])

    def _recorded(capture_items):
        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                pause = _FOLDER / "sleep"
                time.sleep(float(pause.read_text()) if pause.exists() else 0.0)
                return capture_items(*args, **kwargs)
            finally:
                row = {"pid": os.getpid(), "start": start, "end": time.time(), "out": str(args[3])}
                with open(_FOLDER / "sections.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        return wrapper

    class _SectionHook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "lib.capture.run":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                module.capture_items = _recorded(module.capture_items)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _SectionHook())
