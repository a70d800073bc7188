"""P6: a second identical `tourguide demo` run vs the first, each a fresh process with Prefect's
ephemeral API, from an empty cache (the first run trains the demo teacher). Target ≤ 0.25.

Run: .venv/bin/python tests/bench/bench_demo.py [--keep-teacher]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def timed_demo(env: dict, runs_root: Path) -> float:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "flows", "demo", "--runs-root", str(runs_root)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"demo failed:\n{res.stderr[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep-teacher", action="store_true", help="reuse the user's cached demo teacher (first run then excludes training)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        env.pop("PREFECT_API_URL", None)
        if not a.keep_teacher:
            env["TOURGUIDE_CACHE"] = str(Path(tmp) / "cache")
        first = timed_demo(env, Path(tmp) / "runs")
        second = timed_demo(env, Path(tmp) / "runs")
        print(f"P6 demo: first run {first:.1f}s{'' if a.keep_teacher else ' (incl. training the teacher)'}, "
              f"second identical run {second:.1f}s → ratio {second / first:.3f}")


if __name__ == "__main__":
    main()
