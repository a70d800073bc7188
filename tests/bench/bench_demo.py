"""P6: a second identical `tourguide demo` run vs the first, each a fresh process, from an empty
cache (the first run trains the demo teacher). Target ≤ 0.25. With --server, both runs use a
`tourguide server` started (and stopped) here; without, each run starts Prefect's throwaway API.

Run: .venv/bin/python tests/bench/bench_demo.py [--keep-teacher] [--server] [--limit N]
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
sys.path.insert(0, str(ROOT))
from tests.e2e.harness import free_port  # noqa: E402  (needs ROOT on sys.path)


def timed_demo(env: dict, runs_root: Path, extra: list[str]) -> float:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "flows", "demo", "--runs-root", str(runs_root), *extra], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"demo failed:\n{res.stderr[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep-teacher", action="store_true", help="reuse the user's cached demo teacher (first run then excludes training)")
    ap.add_argument("--server", action="store_true", help="run both demos against `tourguide server start`")
    ap.add_argument("--limit", type=int, default=None, help="blurbs (default: the demo's 200)")
    a = ap.parse_args()
    extra = ["--limit", str(a.limit)] if a.limit else []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        env.pop("PREFECT_API_URL", None)
        if not a.keep_teacher:
            env["TOURGUIDE_CACHE"] = str(Path(tmp) / "cache")
        server = [sys.executable, "-m", "flows", "server"]
        if a.server:
            env["PREFECT_UI_ENABLED"] = "false"
            subprocess.run([*server, "start", "--port", str(free_port())], cwd=ROOT, env=env, check=True)
        try:
            first = timed_demo(env, Path(tmp) / "runs", extra)
            second = timed_demo(env, Path(tmp) / "runs", extra)
        finally:
            if a.server:
                subprocess.run([*server, "stop"], cwd=ROOT, env=env)
        print(f"P6 demo ({'tourguide server' if a.server else 'throwaway API'}): first run {first:.1f}s"
              f"{'' if a.keep_teacher else ' (incl. training the teacher)'}, second identical run {second:.1f}s "
              f"→ ratio {second / first:.3f}")


if __name__ == "__main__":
    main()
