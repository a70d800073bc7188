"""P4: fold a synthetic ~1.5 GB Qwen3-shaped checkpoint (random bf16 weights, written here).

Figures, each job in its own subprocess (so peak RSS is its own), baselines measured in the same run:

- wall time of `fold_checkpoint` vs a plain copy of the same files (copy + fsync, the same
  durability the fold gives its shards); target ≤ 1.5. Two fold jobs: permutations only (GQA
  heads + MLP neurons in every block: I/O bound) and the full job (global rotation + the
  permutations: float64 matmuls, compute bound on 2 cores);
- peak RSS vs the largest tensor (target ≤ 4x), also shown above the interpreter's
  post-import RSS;
- the same full job through `from_pretrained` + in-memory fold + `save_pretrained`;
- the fold's GEMM throughput (its rotation FLOPs / its wall time) vs bare float32 `torch.matmul`
  of the same shapes (the fold's row chunks) in the same run: goal ≥ 0.7. A bf16 checkpoint's
  rotation runs in float32 (lib.fold.apply._Fp32Rotation), so float32 is the matching limit.

Run: .venv/bin/python tests/bench/bench_fold.py [--layers 28 --hidden 1024 --vocab 151936]
     (--quick: 4 layers, a few seconds; --skip-hf: leave out the from_pretrained comparison)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def rss_peak_mb() -> float:
    """Peak resident set of this process in MiB since the last `reset_rss_peak` (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_rss_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs), so that the
    interpreter's import peak does not hide the job's own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# the synthetic checkpoint
# ----------------------------------------------------------------------------------------------
def qwen3_config(a) -> dict:
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.head_dim, tie_word_embeddings=False, rms_norm_eps=1e-6,
                      max_position_embeddings=4096).to_dict()
    cfg["dtype"] = "bfloat16"
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    return cfg


def write_checkpoint(folder: Path, cfg: dict, shard_bytes: int) -> tuple[int, int]:
    """Random bf16 weights in HF layout, sharded with an index. Returns (total bytes, largest tensor)."""
    import torch
    from safetensors.torch import save_file

    from lib.models.adapters import adapter_for_config

    folder.mkdir(parents=True)
    adapter = adapter_for_config(cfg)
    shapes = adapter.expected_tensors()
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map = {}
    total = largest = 0
    names = sorted(shapes)

    def flush():
        k = len(weight_map_files) + 1
        name = f"model-{k:05d}-of-NNNNN.safetensors"
        save_file(shards[-1], str(folder / name), metadata={"format": "pt"})
        weight_map_files.append(name)
        for t in shards[-1]:
            weight_map[t] = name
        shards[-1] = {}

    weight_map_files: list[str] = []
    for n in names:
        shape = shapes[n]
        if len(shape) == 1:
            t = (torch.rand(shape, generator=g) + 0.5).to(torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[-1][n] = t
        size += nbytes
        total += nbytes
        largest = max(largest, nbytes)
    flush()
    n_files = len(weight_map_files)
    for old in weight_map_files:
        new = old.replace("NNNNN", f"{n_files:05d}")
        (folder / old).rename(folder / new)
        for t, f in weight_map.items():
            if f == old:
                weight_map[t] = new
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}, indent=2))
    return total, largest


def write_specs(run: Path, cfg: dict) -> dict[str, Path]:
    import numpy as np

    from lib.fold.spec import write_transform_spec
    from lib.testing.random_transforms import random_head_permutation, random_rotation

    rng = np.random.default_rng(0)
    L, H, G, inter = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    perms = dict(head_permutations={i: random_head_permutation(H, G, i) for i in range(L)},
                 neuron_permutations={i: rng.permutation(inter) for i in range(L)})
    return {"perm": write_transform_spec(run / "perm", cfg, **perms),
            "full": write_transform_spec(run / "full", cfg, residual_rotation=random_rotation(cfg["hidden_size"], 1),
                                         **perms)}


# ----------------------------------------------------------------------------------------------
# jobs (each runs in a child process)
# ----------------------------------------------------------------------------------------------
def child(job: str, src: str, out: str, spec: str, device: str = "cpu") -> dict:
    import gc

    import torch  # noqa: F401  (import cost is part of the RSS baseline, not of the job)
    import transformers  # noqa: F401

    from lib.fold.checkpoint import fold_checkpoint, fold_state_dict
    from lib.fold.options import FoldOptions
    from lib.fold.transform_set import WeightTransformSet

    gc.collect()
    reset_rss_peak()
    base = rss_now_mb()
    t = time.perf_counter()
    if job == "copy":
        Path(out).mkdir()
        for f in sorted(Path(src).iterdir()):
            shutil.copyfile(f, Path(out) / f.name)
            with open(Path(out) / f.name, "rb+") as fh:
                os.fsync(fh.fileno())
    elif job in ("fold-perm", "fold-full"):
        cfg = json.loads((Path(src) / "config.json").read_text())
        ts = WeightTransformSet.from_spec(spec, cfg)
        fold_checkpoint(src, out, ts, FoldOptions(max_shard_bytes=1 << 30, device=device))
    elif job == "gemm":  # the limit: bare float32 matmuls of the fold's own GEMM shapes (its row chunks)
        from safetensors import safe_open

        from lib.fold.options import CHUNK_BYTES

        d = json.loads((Path(src) / "config.json").read_text())["hidden_size"]
        rot = torch.randn(d, d)
        flops = spent = 0.0
        for f in sorted(Path(src).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    shape = fh.get_slice(k).get_shape()
                    if len(shape) != 2:
                        continue
                    m = shape[0] * shape[1] // d
                    step = max(1, CHUNK_BYTES // (8 * d))
                    for a in range(0, m, step):
                        x = torch.randn(min(step, m - a), d)
                        t0 = time.perf_counter()
                        torch.matmul(x, rot)
                        flops += 2.0 * x.shape[0] * d * d
                        spent += time.perf_counter() - t0  # only the matmul counts, not making x
        return {"seconds": spent, "flops": flops, "peak_rss_mb": rss_peak_mb(), "base_rss_mb": base}
    elif job == "hf-full":
        from transformers import AutoModelForCausalLM

        cfg = json.loads((Path(src) / "config.json").read_text())
        ts = WeightTransformSet.from_spec(spec, cfg)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        sd, new_cfg = fold_state_dict(model.state_dict(), cfg, ts, FoldOptions(device=device))
        model.load_state_dict(sd, assign=True)
        model.config.tie_word_embeddings = new_cfg["tie_word_embeddings"]
        model.save_pretrained(out, max_shard_size="1GB")
    else:
        raise SystemExit(f"unknown job {job}")
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": rss_peak_mb(), "base_rss_mb": base}


def run_child(job: str, src: Path, out: Path, spec: Path | None, device: str = "cpu") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", job, "--src", str(src), "--out", str(out), "--spec", str(spec or ""),
           "--fold-device", device]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{job} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--quick", action="store_true", help="4 layers, vocab 32000: a smoke run")
    ap.add_argument("--skip-hf", action="store_true", help="leave out the from_pretrained/save_pretrained job")
    ap.add_argument("--fold-device", default="cpu", help="where the fold's float64 math runs (cpu | cuda)")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.src, a.out, a.spec, a.fold_device)))
        return
    if a.quick:
        a.layers, a.vocab = 4, 32000

    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        work = Path(tmp)
        cfg = qwen3_config(a)
        t = time.perf_counter()
        total, largest = write_checkpoint(work / "src", cfg, shard_bytes=1 << 30)
        specs = write_specs(work / "run", cfg)
        print(f"synthetic Qwen3-shaped checkpoint: {a.layers} layers, d={a.hidden}, vocab={a.vocab}, bf16, untied: "
              f"{total / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB (written in {time.perf_counter() - t:.0f} s)")
        run_child("copy", work / "src", work / "warm", None)  # warm the page cache for every job alike
        copy = run_child("copy", work / "src", work / "copy", None)
        dev = a.fold_device
        jobs = {"fold (permutations only)": run_child("fold-perm", work / "src", work / "out", specs["perm"], dev),
                "fold (rotation + permutations)": run_child("fold-full", work / "src", work / "out", specs["full"], dev)}
        if not a.skip_hf:
            jobs["from_pretrained + save_pretrained (rotation + permutations)"] = run_child(
                "hf-full", work / "src", work / "hf", specs["full"], dev)
        print(f"\nbaseline: plain copy + fsync {copy['seconds']:.2f} s ({total / copy['seconds'] / 1e9:.2f} GB/s), "
              f"peak RSS {copy['peak_rss_mb']:.0f} MB")
        print(f"{'job':62s} {'wall s':>7s} {'÷ copy':>7s} {'peak RSS MB':>11s} {'÷ largest':>9s} {'(above import)':>14s}")
        for name, r in jobs.items():
            print(f"{name:62s} {r['seconds']:7.1f} {r['seconds'] / copy['seconds']:7.2f} {r['peak_rss_mb']:11.0f} "
                  f"{r['peak_rss_mb'] / (largest / 2**20):9.2f} "
                  f"{(r['peak_rss_mb'] - r['base_rss_mb']) / (largest / 2**20):14.2f}")
        gemm = run_child("gemm", work / "src", work / "gemm", None)
        full = jobs["fold (rotation + permutations)"]["seconds"]
        rate_fold, rate_bare = gemm["flops"] / full, gemm["flops"] / gemm["seconds"]
        print(f"\nfold GEMM throughput: {gemm['flops'] / 1e12:.2f} TFLOP (float32: bf16 checkpoint) in {full:.1f} s = "
              f"{rate_fold / 1e9:.1f} GFLOP/s; bare torch.matmul of the same shapes {gemm['seconds']:.1f} s = "
              f"{rate_bare / 1e9:.1f} GFLOP/s → ratio {rate_fold / rate_bare:.3f} (goal ≥ 0.7; the fold's time "
              "includes reading, casts, the float64 repairs and writing)")
        print("targets: permutation-only ÷ copy ≤ 1.2, peak RSS ÷ largest tensor ≤ 4")


if __name__ == "__main__":
    main()
