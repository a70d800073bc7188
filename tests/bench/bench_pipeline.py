"""`tourguide pipeline` wall time and where it goes, for the README's per-billion-parameter estimate.

    .venv/bin/python tests/bench/bench_pipeline.py [--quick] [--limit 64]

Builds (in a temp folder) a random Qwen3 teacher (~150M parameters, 32k vocabulary; --quick: a
tiny one) and a student = the teacher with a planted rotation and head/neuron permutations,
then runs `tourguide pipeline` twice in a subprocess (the second run is served from the caches)
and reads the task-run times of the first from the throwaway Prefect database. Also measures
this machine's fp32 / float64 GEMM rates and fsync'd write rate, the units the README
extrapolates with. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def machine_rates() -> dict[str, float]:
    import torch

    def gemm(dtype, n=1024, reps=5) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9

    with tempfile.TemporaryDirectory() as d:
        data = os.urandom(64 << 20)
        t = time.perf_counter()
        for i in range(4):
            with open(Path(d) / f"f{i}", "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        write = 4 * len(data) / (time.perf_counter() - t) / 1e6
    return {"fp32_gemm_gflops": gemm(torch.float32), "fp64_gemm_gflops": gemm(torch.float64),
            "fsync_write_mb_s": write, "torch_threads": torch.get_num_threads()}


def build_pair(root: Path, quick: bool) -> tuple[Path, Path, int]:
    from lib.demo.planted import plant_student
    from lib.testing.tiny_models import TinySpec, build_tiny_model, train_tokenizer

    tok = train_tokenizer(root / "tok", vocab_size=1024)
    spec = (TinySpec(family="qwen3") if quick else
            TinySpec(family="qwen3", hidden_size=768, num_layers=14, num_heads=12, num_kv_heads=4, head_dim=64,
                     intermediate_size=2048, vocab_size=32768))
    teacher = build_tiny_model(root / "teacher", spec, tokenizer_dir=tok)
    plant_student(teacher, root / "student", seed=1, noise=0.0)
    from transformers import AutoConfig, AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(teacher)).parameters())
    return teacher, root / "student", n_params


def stage_times(prefect_home: Path) -> dict[str, float]:
    """Seconds per task family (capture batches, rotate, fold write, gate, QA metrics, ...) from
    the ephemeral API's SQLite database (task names, summed run times)."""
    db = sqlite3.connect(prefect_home / "prefect.db")
    out: dict[str, float] = defaultdict(float)
    from datetime import datetime

    for key, start, end in db.execute("SELECT task_key, start_time, end_time FROM task_run WHERE end_time IS NOT NULL"):
        secs = (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()
        out[str(key).rsplit("-", 1)[0]] += secs  # task_key = <function name>-<hash>
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as d:
        root = Path(d)
        t = time.perf_counter()
        teacher, student, n_params = build_pair(root, a.quick)
        built = time.perf_counter() - t
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(root / "prefect"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}  # a fresh database migrates first
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "flows", "pipeline", "--teacher", str(teacher), "--student", str(student),
               "--runs-root", str(root / "runs"), "--run-id", "bench", "--limit", str(a.limit), "--max-length",
               str(a.max_length), "--batch-size", "16", "--device", "cpu"]
        walls, outs, stages = [], [], {}
        for _ in range(2):
            t = time.perf_counter()
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            walls.append(time.perf_counter() - t)
            if res.returncode != 0:
                sys.exit(res.stderr[-4000:])
            outs.append(res.stdout)
            stages = stages or stage_times(root / "prefect")  # the first run's
        n_tokens = int(outs[0].split("Transports: ", 1)[1].split()[0])
        print(json.dumps({"n_params": n_params, "n_tokens": n_tokens, "build_s": round(built, 1),
                          "first_run_s": round(walls[0], 1), "second_run_s": round(walls[1], 1),
                          "stages_s": {k: round(v, 1) for k, v in stages.items()},
                          "machine": {k: round(v, 1) for k, v in machine_rates().items()}}, indent=2))
        print(outs[0])


if __name__ == "__main__":
    main()
