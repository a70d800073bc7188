#!/usr/bin/env bash
# GPU device check for the capture backends (issue 7). Run on a lent GPU machine from the repo
# root; well under 10 minutes on one H100:
#
#   bash tests/gpu/device_check.sh                # results also in $OUT/device_check.json
#
# 1. installs carried wheels when a dependency is missing ($WHEELS, default .device-wheels:
#    a folder of wheels for transformers/tokenizers/safetensors/... and, if it fits, vllm);
# 2. builds a random ~0.5B Qwen3 (Qwen3-0.6B shapes, 28 layers, vocab 151936) in bf16 on the GPU;
# 3. torch backend, bf16, every decoder block, 256 prompts: tokens/s of a bare forward, of the
#    capture forward (hooks + copies) and of run_capture end to end (+ shard writes), per batch
#    size, and peak GPU memory;
# 4. when vLLM imports: engine start, plain vLLM prefill (max_tokens=1) vs all-layer capture of
#    the same prompts (P7 target <= 2.0x), vLLM tokens/s, and bf16 parity with the torch backend
#    (relative Frobenius and max|d|/max|torch| per tensor, 16 prompts with logits).
#    Without vLLM it says so and reports the torch backend alone.
#
# TINY=1 runs the same script with a 2-layer model on CPU (a smoke test of this script).
# N_PROMPTS (256), BATCH_SIZES ("16 64") override the workload.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-python3}"
WHEELS="${WHEELS:-.device-wheels}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
[ "${TINY:-0}" = 1 ] && export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"

if ! "$PY" -c "import torch, transformers, tokenizers, safetensors, numpy" 2>/dev/null; then
  if [ -d "$WHEELS" ]; then
    echo "device_check: installing carried wheels from $WHEELS" >&2
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" transformers tokenizers safetensors huggingface_hub numpy
  else
    echo "device_check: transformers/tokenizers/safetensors missing and no $WHEELS folder of wheels; cannot run" >&2
    exit 1
  fi
fi
if ! "$PY" -c "import vllm" 2>/dev/null && compgen -G "$WHEELS/vllm*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" vllm || echo "device_check: the carried vLLM wheel did not install" >&2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "device_check: no nvidia-smi (CPU run)"

script="$(mktemp -d)/device_check.py"  # a real file: spawned vLLM processes re-import the main module
cat > "$script" <<'EOF'
import dataclasses, gc, json, os, shutil, subprocess, tempfile, time
from pathlib import Path

import torch

from lib.capture import CaptureSpec, forward_batch, get_model, plan_capture, run_capture, batches_by_length
from lib.corpus import Sample, load_texts
from lib.tiny_models import TinySpec, make_config, randomize_extras, train_tokenizer


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def log(msg):
    print(f"[device_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_used_mib():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return int(out[0])
    except Exception:
        return None


def main():
    TINY = os.environ.get("TINY") == "1"
    DEV = "cpu" if TINY or not torch.cuda.is_available() else "cuda"
    DT = "float32" if DEV == "cpu" else "bfloat16"
    N = int(os.environ.get("N_PROMPTS", "16" if TINY else "256"))
    BATCHES = [int(b) for b in os.environ.get("BATCH_SIZES", "8" if TINY else "16 64").split()]
    OUT = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="device-check-"))
    work = Path(tempfile.mkdtemp(prefix="device-check-work-"))
    res: dict = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "dtype": DT, "n_prompts": N}
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)

    # --- model: random Qwen3 with Qwen3-0.6B shapes, built in bf16 on the device -----------------
    t0 = time.perf_counter()
    tok_dir = train_tokenizer(work / "tok", vocab_size=1024)
    shape = (TinySpec(family="qwen3", hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                      intermediate_size=256, max_position_embeddings=2048) if TINY else
             TinySpec(family="qwen3", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                      intermediate_size=3072, tie_word_embeddings=True, max_position_embeddings=4096))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = make_config(shape, vocab_size=len(tok) if TINY else 151936, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(DEV):
        m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, DT))
    randomize_extras(m, 0)
    model_dir = work / "qwen3-random"
    m.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    res["params_M"] = round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
    del m
    gc.collect()
    log(f"built {res['params_M']}M-parameter Qwen3 in {time.perf_counter() - t0:.1f}s at {model_dir}")

    # --- prompts: the corpus, then pairs of blurbs for longer prompts, N in all --------------------
    corpus = [s.text for s in load_texts()]
    texts = (corpus + [a + " " + b for a, b in zip(corpus, corpus[1:] + corpus[:1])])[:N]
    samples = [Sample(i, f"text:{i}", t) for i, t in enumerate(texts)]
    hooks = ()  # every decoder block

    # --- torch backend -------------------------------------------------------------------------------
    torch_res = {}
    for bs in BATCHES:
        spec = CaptureSpec(model=str(model_dir), dtype=DT, device=DEV, batch_size=bs, logits=False, max_length=512)
        plan = plan_capture(spec, samples)
        lm = get_model(spec, plan)
        n_tok = sum(len(it.token_ids) for it in plan.items)
        batches = batches_by_length(list(plan.items), bs)

        def bare():
            with torch.inference_mode():
                for b in batches:
                    w = max(len(it.token_ids) for it in b)
                    ids = torch.full((len(b), w), lm.pad_id, dtype=torch.long)
                    mask = torch.zeros_like(ids)
                    for i, it in enumerate(b):
                        ids[i, : len(it.token_ids)] = torch.tensor(it.token_ids)
                        mask[i, : len(it.token_ids)] = 1
                    lm.adapter.base_model(lm.model)(input_ids=ids.to(DEV), attention_mask=mask.to(DEV), use_cache=False)
            sync()

        def hooked():
            for b in batches:
                forward_batch(lm, plan.hook_points, [it.token_ids for it in b], False, DT)
            sync()

        bare()  # warm-up (kernels, allocator)
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_bare = min(timed(bare), timed(bare))
        hooked()  # warm-up: host-side buffers for the copies
        t_hook = min(timed(hooked), timed(hooked))
        out_dir = work / f"torch-bs{bs}"
        t = time.perf_counter(); run_capture(spec, samples, out_dir); t_run = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else None
        torch_res[bs] = {"tokens": n_tok, "bare_tok_s": round(n_tok / t_bare), "capture_fwd_tok_s": round(n_tok / t_hook),
                         "run_capture_tok_s": round(n_tok / t_run), "capture_fwd_over_bare": round(t_hook / t_bare, 2),
                         "run_capture_over_bare": round(t_run / t_bare, 2), "peak_gpu_mib": peak and round(peak)}
        log(f"torch bs={bs}: {torch_res[bs]}")
    res["torch"] = torch_res

    # parity reference: 16 prompts with logits, torch backend
    PAR = samples[:16]
    par_kw = dict(model=str(model_dir), dtype=DT, device=DEV, batch_size=16, logits=True, max_length=512)
    run_capture(CaptureSpec(**par_kw, backend="torch"), PAR, work / "parity-torch")
    import lib.capture.torch_backend as capmod
    capmod._load_cached.cache_clear()
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()

    # --- vLLM backend --------------------------------------------------------------------------------
    try:
        import lib.capture.vllm_backend as vb
        res["vllm_version"] = vb.require_vllm()
    except Exception as exc:
        res["vllm"] = f"not run: {exc}"
        log(f"vLLM unavailable, torch backend only: {str(exc)[:200]}")
    else:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        opts = {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.5, "max_model_len": 1024, "enforce_eager": True}
        vspec = CaptureSpec(model=str(model_dir), dtype=DT, device=DEV, batch_size=N, logits=False, max_length=512,
                            backend="vllm", vllm_options=opts)
        plan = plan_capture(vspec, samples)
        items = list(plan.items)
        n_tok = sum(len(it.token_ids) for it in items)
        engine = vb.get_engine(vspec, plan)
        vres = {"engine_start_s": round(vb.LAST_ENGINE_START_S, 1)}
        prompts = [TokensPrompt(prompt_token_ids=list(it.token_ids)) for it in items]
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

        def plain():
            vb.disarm_engine(engine)
            t = time.perf_counter(); engine.llm.generate(prompts, params, use_tqdm=False); return time.perf_counter() - t

        def capture(logits):
            s = dataclasses.replace(vspec, logits=logits)
            t = time.perf_counter(); vb.forward_batch_vllm(s, plan, items); return time.perf_counter() - t

        plain()  # warm-up
        t_plain = min(plain(), plain())
        t_cap = min(capture(False), capture(False))
        vres.update(tokens=n_tok, plain_prefill_tok_s=round(n_tok / t_plain), capture_tok_s=round(n_tok / t_cap),
                    capture_over_plain=round(t_cap / t_plain, 2), p7_target_met=t_cap / t_plain <= 2.0,
                    gpu_used_mib_after=gpu_used_mib())
        log(f"vLLM: {vres}")
        # bf16 parity on 16 prompts with logits
        par_spec = CaptureSpec(**par_kw, backend="vllm", vllm_options=opts)
        run_capture(par_spec, PAR, work / "parity-vllm")
        from lib.shards import load_shard, read_index

        worst = {}
        for r in read_index(work / "parity-torch"):
            a, _ = load_shard(work / "parity-torch" / r.shard)
            b, _ = load_shard(work / "parity-vllm" / r.shard)
            assert torch.equal(a["input_ids"], b["input_ids"]), r.shard
            for k in a:
                if k == "input_ids":
                    continue
                x, y = a[k].double(), b[k].double()
                fro = float((x - y).norm() / x.norm())
                mx = float((x - y).abs().max() / x.abs().max())
                kind = "logits" if k == "logits" else "act"
                w = worst.setdefault(kind, {"rel_fro": 0.0, "rel_max": 0.0})
                w["rel_fro"], w["rel_max"] = max(w["rel_fro"], fro), max(w["rel_max"], mx)
        BF16_TOL = 5e-2  # relative Frobenius; bf16 through 28 layers with different kernels
        vres["parity_bf16"] = {**worst, "tolerance_rel_fro": BF16_TOL,
                               "ok": all(w["rel_fro"] <= BF16_TOL for w in worst.values())}
        log(f"parity (bf16, 16 prompts): {vres['parity_bf16']}")
        res["vllm"] = vres
        vb.shutdown_engine()

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "device_check.json").write_text(json.dumps(res, indent=1))
    shutil.rmtree(work, ignore_errors=True)  # the model and shards: gigabytes on the GPU machine
    print(json.dumps(res, indent=1))


if __name__ == "__main__":  # vLLM's CPU platform spawns its workers, which re-import this file
    main()
EOF
exec "$PY" "$script"
