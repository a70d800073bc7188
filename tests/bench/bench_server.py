"""P8: capturing 6 texts with a tiny model through `tourguide capture` with a running
`tourguide server` vs the same capture through the library alone (lib.capture.run.run_capture),
each a fresh process (both pay Python, torch and transformers imports). Target <= 1.5.
Also the same command with Prefect's throwaway API (no server), for the record.

Run: PYTHONPATH=. .venv/bin/python tests/bench/bench_server.py [--repeats 2]
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

LIB = """
import sys
from lib.capture.run import run_capture
from lib.capture.spec import CaptureSpec
from lib.store.corpus import load_texts
run_capture(CaptureSpec(model=sys.argv[1], device="cpu"), load_texts(sys.argv[3:]), sys.argv[2])
"""


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{res.stderr[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    from lib.testing.tiny_models import TinySpec, build_tiny_model, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(build_tiny_model(work / "model", TinySpec(family="qwen3"),
                                     tokenizer_dir=train_tokenizer(work / "tok", vocab_size=512)))
        base = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "HF_HUB_OFFLINE": "1", "PREFECT_UI_ENABLED": "false"}
        base.pop("PREFECT_API_URL", None)
        with_server = {**base, "PREFECT_HOME": str(work / "home-server")}
        throwaway = {**base, "PREFECT_HOME": str(work / "home-throwaway")}
        cli = [sys.executable, "-m", "flows"]
        t0 = time.perf_counter()
        subprocess.run([*cli, "server", "start", "--port", str(free_port())], env=with_server, check=True,
                       capture_output=True)
        print(f"server start (fresh database): {time.perf_counter() - t0:.1f}s")
        res: dict[str, list[float]] = {"lib": [], "server": [], "throwaway": []}
        try:
            for r in range(a.repeats):
                # new texts per repeat: every run computes (no cache hits), as a first capture does
                texts = [f"Stop {i} of tour {r}: the old harbour, the market and the tower." for i in range(6)]
                args = [x for t in texts for x in ("--text", t)]
                res["lib"].append(timed([sys.executable, "-c", LIB, model, str(work / f"lib{r}"), *texts], base))
                res["server"].append(timed([*cli, "capture", "--model", model, "--output-dir", str(work / f"s{r}"),
                                            *args], with_server))
                res["throwaway"].append(timed([*cli, "capture", "--model", model, "--output-dir",
                                               str(work / f"t{r}"), *args], throwaway))
        finally:
            subprocess.run([*cli, "server", "stop"], env=with_server, capture_output=True)
    lib = min(res["lib"])
    for k, ts in res.items():
        print(f"P8 {k:9s}: " + ", ".join(f"{t:.1f}s" for t in ts) + f" (best {min(ts):.1f}s)"
              + ("" if k == "lib" else f" → ratio vs library {min(ts) / lib:.2f}"))


if __name__ == "__main__":
    main()
