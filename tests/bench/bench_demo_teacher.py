"""Demo-teacher training time vs torch intra-op threads, on a quiet and on a loaded machine.

Each measurement is a fresh process that trains the default demo teacher (lib.demo.teacher,
DemoRecipe()) with torch.set_num_threads(N) (0 = torch's default: one thread per core). "loaded"
adds --load busy processes (each a default-threaded torch matmul loop, i.e. other people's jobs
on the same cores) for the duration of the measurement. Runs are interleaved and repeated.

Run: PYTHONPATH=. .venv/bin/python tests/bench/bench_demo_teacher.py [--repeats 2] [--load 2] [--threads 1 0] [--steps 120]
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
TRAIN = """
import sys, time, torch
from pathlib import Path
n = int(sys.argv[1])
if n:
    torch.set_num_threads(n)
from lib.demo.teacher import DemoRecipe, train_demo_teacher
t = time.perf_counter()
train_demo_teacher(Path(sys.argv[2]), DemoRecipe(steps=int(sys.argv[3])), log=lambda *_: None, threads=n or None)
print(time.perf_counter() - t)
"""
BUSY = """
import torch
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def train(threads: int, out: Path, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", TRAIN, str(threads), str(out), str(steps)], env=env, capture_output=True,
                         text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--load", type=int, default=2, help="busy competitor processes in the loaded condition")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0 = torch default")
    ap.add_argument("--steps", type=int, default=120, help="training steps (the demo's recipe: 120)")
    a = ap.parse_args()
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} before starting")
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cond in ("as is", "loaded"):
            busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(a.load if cond == "loaded" else 0)]
            try:
                time.sleep(1 if busy else 0)
                for r in range(a.repeats):
                    for n in a.threads:
                        t = train(n, Path(tmp) / f"{cond}-{n}-{r}", a.steps)
                        times.setdefault((cond, n), []).append(t)
                        print(f"  {cond}, threads {n or 'default'}: {t:.1f}s (load average {os.getloadavg()[0]:.1f})",
                              flush=True)
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
    for (cond, n), ts in times.items():
        label = f"{n} thread(s)" if n else "torch default threads"
        print(f"teacher training, {cond:6s}, {label:22s}: " + ", ".join(f"{t:.1f}s" for t in ts)
              + f" (best {min(ts):.1f}s, worst {max(ts):.1f}s)")
    for cond in ("as is", "loaded"):
        if (cond, 1) in times and (cond, 0) in times:
            print(f"{cond}: default/1-thread ratio of medians "
                  f"{sorted(times[(cond, 0)])[len(times[(cond, 0)]) // 2] / sorted(times[(cond, 1)])[len(times[(cond, 1)]) // 2]:.2f}")


if __name__ == "__main__":
    main()
