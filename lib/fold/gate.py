"""The fp32 equivalence gate: does a folded checkpoint compute the same function as its source?

Both checkpoints are loaded with `AutoModelForCausalLM` in float32 (the folded one from disk, as
any user would load it) and run on one probe batch (texts from the corpus, right padding with an
attention mask, real tokens only). Figures:

- max|Δlogit| and mean / max KL(source ‖ folded) per token (float64 log-softmax),
- top-1 agreement,
- hidden-state cosine per decoder block in the common basis: the folded residual h' = h·Q_l is
  mapped back with h'·Q_lᵀ and compared with the source's h (residual before the final norm).

`gate_fold` runs it after a fold, writes `fold_report.json` (status passed | failed | inexact),
marks a failed output with a `FOLD_FAILED` file, appends a row to the run's `fold` ledger when
the output lies inside a run folder with `ledgers/`, and raises GateFailedError when an exact
fold fails. An inexact fold (--allow-inexact) is measured and reported, never "passed".

    from lib.equivalence import check_equivalence
    result = check_equivalence("teacher/", "student/", transforms)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from lib.core.errors import BadInputError, ModelLoadError
from lib.core.options import Frozen, Options, PathStr, Seq
from lib.fold.checkpoint_io import CheckpointReader
from lib.fold.transform_set import WeightTransformSet
from lib.qa.token_metrics import compute_token_cosine, compute_token_kl
from lib.models.adapters import adapter_for_config

BUILTIN_PROBE_TEXTS = (
    "The old lighthouse on the northern cape has guided ships home since 1868.",
    "Visitors climb two hundred steps to the bell tower for a view across the valley.",
    "这座古老的寺庙建于明代，以精美的木雕闻名。",
    "The museum's east wing holds hand-painted maps from the age of sail.",
    "沿着城墙步行一圈大约需要两个小时，傍晚的风景最美。",
    "In spring the cherry trees along the canal bloom for about two weeks.",
    "The abbey kitchen still has its original hearth, large enough to roast an ox.",
    "博物馆里收藏着许多珍贵的青铜器和瓷器。",
)


class GateThresholds(Frozen):
    """Pass limits. A correct fp32 fold of a tiny model sits near 1e-6 / 1e-13; every known fold
    bug gives KL ≥ 1e-3. Half-precision outputs carry one rounding per weight, so they get
    smoke-test limits only (bf16 is a smoke test, not a proof)."""

    max_abs_logit_diff: float = 1e-2
    max_mean_kl: float = 1e-6
    min_top1: float = 0.99
    min_hidden_cosine: float = 0.9999

    @classmethod
    def for_dtype(cls, dtype: str) -> GateThresholds:
        if dtype in ("float32", "float64"):
            return cls()
        if dtype == "float16":
            return cls(max_abs_logit_diff=float("inf"), max_mean_kl=1e-3, min_top1=0.95, min_hidden_cosine=0.99)
        return cls(max_abs_logit_diff=float("inf"), max_mean_kl=1e-2, min_top1=0.9, min_hidden_cosine=0.99)


class GateOptions(Options):
    """Probe batch and limits (`tourguide fold` gate flags; the fold flow's `gate_options`).
    Unset limits take `GateThresholds.for_dtype(checkpoint dtype)`."""

    label = "gate options"

    n_texts: int = Field(8, ge=1, description="probe texts, spread over the corpus")
    max_length: int = Field(64, ge=1, description="tokens per probe text")
    text_files: Seq[PathStr] = Field((), description="take probe texts from these UTF-8 files (one per line)")
    device: str = Field("auto", description="device for the gate's forward passes (auto: cuda when available)")
    seed: int = Field(0, description="seed of the random token ids probing a checkpoint without a tokenizer")
    max_abs_logit_diff: float | None = Field(None, description="max|Δlogit| limit (default: by output dtype)")
    max_mean_kl: float | None = Field(None, description="mean-KL limit (default: by output dtype)")
    min_top1: float | None = Field(None, description="top-1 agreement limit (default: by output dtype)")
    min_hidden_cosine: float | None = Field(None, description="hidden-state cosine limit (default: by output dtype)")

    def thresholds(self, dtype: str) -> GateThresholds:
        base = GateThresholds.for_dtype(dtype)
        over = {k: getattr(self, k) for k in GateThresholds.model_fields if getattr(self, k) is not None}
        return base.model_copy(update=over)


class GateResult(Frozen):
    """Gate figures (JSON-able: `model_dump(mode="json")`). status: passed | failed | inexact."""

    status: str
    exact: bool
    passed: bool
    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    hidden_cosine_min: float
    hidden_cosine_by_layer: dict[str, float]
    n_tokens: int
    n_texts: int
    probe_source: str
    checkpoint_dtype: str
    thresholds: dict[str, float]
    failures: list[str] = []
    seconds: float = 0.0


@dataclass(frozen=True, eq=False)
class ProbeBatch:
    """input_ids [B, T] int64 and attention_mask [B, T] int64 (right padded)."""

    input_ids: Any
    attention_mask: Any
    source: str
    n_texts: int


def probe_texts(n: int, text_files: Sequence[str] = ()) -> tuple[list[str], str]:
    """n texts spread evenly over the corpus (both languages), or over `text_files`; the built-in
    blurbs when the corpus folder is empty. Returns (texts, source label)."""
    from lib.store.corpus import load_texts

    if n < 1:
        raise BadInputError(f"--probe-texts must be >= 1, got {n}")
    try:
        samples = load_texts(text_files=list(text_files) or None)
        source = "text-file" if text_files else "corpus"
    except BadInputError:
        if text_files:
            raise
        return list(BUILTIN_PROBE_TEXTS[:n]) * (1 + (n - 1) // len(BUILTIN_PROBE_TEXTS)), "builtin"
    idx = np.unique(np.linspace(0, len(samples) - 1, num=min(n, len(samples))).round().astype(int))
    return [samples[i].text for i in idx], source


def make_probe_batch(model_dir: str | os.PathLike, options: GateOptions = GateOptions()) -> ProbeBatch:
    """Tokenize the probe texts with the checkpoint's tokenizer (right padding + mask). A
    checkpoint without a tokenizer is probed with seeded random token ids instead."""
    import torch

    texts, source = probe_texts(options.n_texts, options.text_files)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:
        tok = None
    if tok is None:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        g = torch.Generator().manual_seed(options.seed)
        ids = torch.randint(0, int(cfg["vocab_size"]), (options.n_texts, options.max_length), generator=g)
        return ProbeBatch(ids, torch.ones_like(ids), "random-ids", options.n_texts)
    rows = [tok(t, add_special_tokens=True)["input_ids"][: options.max_length] for t in texts]
    rows = [r for r in rows if r]
    if not rows:
        raise BadInputError("probe texts tokenized to nothing; pass --probe-text-file with real text")
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ProbeBatch(ids, mask, source, len(rows))


def load_fp32(model_dir: str | os.PathLike, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    from lib.core.dtypes import torch_dtype

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype("float32"))
    except Exception as exc:
        raise ModelLoadError(f"{model_dir}: could not be loaded with AutoModelForCausalLM "
                             f"({exc.__class__.__name__}: {str(exc)[:300]})") from None
    return model.to(device).eval()


def run_probe(model_dir: str | os.PathLike, batch: ProbeBatch, device: str = "cpu") -> dict[str, Any]:
    """Forward the probe batch in float32. Returns {'logits': [N, V] float32, 'hidden': {block:
    [N, d] float32}} over the N real tokens (residual after each block, before the final norm)."""
    import torch

    model = load_fp32(model_dir, device)
    adapter = adapter_for_config(model.config)
    mask = batch.attention_mask.bool()
    hidden: dict[str, Any] = {}
    hooks = []

    def hook_for(name: str):
        def hook(_mod, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            hidden[name] = t.detach().float()[mask.to(t.device)].cpu().clone()
        return hook

    for name in adapter.block_names():
        hooks.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
    try:
        with torch.inference_mode():
            out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                        use_cache=False)
        logits = out.logits.float()[mask.to(out.logits.device)].cpu()
    finally:
        for h in hooks:
            h.remove()
        del model
    return {"logits": logits, "hidden": hidden}


def compare_probes(src: dict[str, Any], out: dict[str, Any],
                   bases: dict[str, np.ndarray | None] | None = None) -> dict[str, Any]:
    """Figures between two `run_probe` results. `bases[block]` is the Q_l with h_out ≈ h_src·Q_l."""
    import torch

    a, b = src["logits"], out["logits"]
    kl = compute_token_kl(a, b)  # the QA metric's KL: float64, p = 0 terms count 0
    diff, agree = 0.0, 0
    for s in range(0, a.shape[0], 64):  # float64 in row chunks: [N, V] at V = 152k is big
        ca, cb = a[s:s + 64].double(), b[s:s + 64].double()
        gap = torch.where(ca == cb, 0.0, (ca - cb).abs())  # equal infinities (masked ids) are no gap
        diff = max(diff, float(gap.max()))
        agree += int((ca.argmax(-1) == cb.argmax(-1)).sum())
    cos_by_layer = {}
    for name, h in src["hidden"].items():
        h2 = out["hidden"][name].double()
        q = (bases or {}).get(name)
        if q is not None:
            h2 = h2 @ torch.from_numpy(np.asarray(q, dtype=np.float64)).T
        cos_by_layer[name] = float(compute_token_cosine(h, h2).min())
    return {
        "max_abs_logit_diff": diff,
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": agree / a.shape[0],
        "hidden_cosine_min": min(cos_by_layer.values(), default=1.0),
        "hidden_cosine_by_layer": cos_by_layer,
        "n_tokens": int(a.shape[0]),
    }


def checkpoint_dtype(model_dir: str | os.PathLike) -> str:
    """The dominant floating dtype of a checkpoint's tensors ('float32', 'bfloat16', ...)."""
    from lib.core.dtypes import ST_DTYPES

    counts: dict[str, int] = {}
    for e in CheckpointReader(model_dir).entries.values():
        if e.dtype in ("F64", "F32", "F16", "BF16"):
            counts[ST_DTYPES[e.dtype]] = counts.get(ST_DTYPES[e.dtype], 0) + e.nbytes
    return max(counts, key=counts.get) if counts else "float32"


def hidden_bases(transforms: WeightTransformSet | None) -> dict[str, np.ndarray | None]:
    if transforms is None:
        return {}
    adapter = transforms.adapter
    return {adapter.block_name(i): transforms.block_rotation(i) for i in range(adapter.num_layers)}


def check_equivalence(source_dir: str | os.PathLike, folded_dir: str | os.PathLike,
                      transforms: WeightTransformSet | None = None, options: GateOptions = GateOptions(),
                      exact: bool | None = None) -> GateResult:
    """Run the probe batch through both checkpoints in float32 and judge the fold. `transforms`
    gives the hidden-state bases (and exactness); no files are written."""
    from lib.models.loading import pick_device

    t0 = time.perf_counter()
    device = pick_device(options.device)
    batch = make_probe_batch(source_dir, options)
    src = run_probe(source_dir, batch, device)  # one model in memory at a time
    out = run_probe(folded_dir, batch, device)
    figures = compare_probes(src, out, hidden_bases(transforms))
    dtype = checkpoint_dtype(folded_dir)
    th = options.thresholds(dtype)
    failures = []
    if not figures["max_abs_logit_diff"] <= th.max_abs_logit_diff:
        failures.append(f"max|Δlogit| {figures['max_abs_logit_diff']:.3g} > {th.max_abs_logit_diff:g}")
    if not figures["mean_kl"] <= th.max_mean_kl:
        failures.append(f"mean KL {figures['mean_kl']:.3g} > {th.max_mean_kl:g}")
    if not figures["top1_agreement"] >= th.min_top1:
        failures.append(f"top-1 agreement {figures['top1_agreement']:.4f} < {th.min_top1:g}")
    if not figures["hidden_cosine_min"] >= th.min_hidden_cosine:
        failures.append(f"min hidden cosine {figures['hidden_cosine_min']:.6f} < {th.min_hidden_cosine:g}")
    is_exact = (transforms.exact if transforms is not None else True) if exact is None else exact
    status = "inexact" if not is_exact else ("passed" if not failures else "failed")
    return GateResult(status=status, exact=is_exact, passed=status == "passed", n_texts=batch.n_texts,
                      probe_source=batch.source, checkpoint_dtype=dtype, thresholds=th.model_dump(), failures=failures,
                      seconds=round(time.perf_counter() - t0, 3), **figures)


def format_gate(result: GateResult, title: str = "Fold equivalence gate") -> str:
    """A markdown table of the gate figures (printed by the CLI, posted as a Prefect artifact)."""
    th = result.thresholds
    verdict = {"passed": "PASSED", "failed": "FAILED", "inexact": "INEXACT (drift reported, not a pass)"}[result.status]
    lines = [f"### {title}: {verdict}", "",
             f"{result.n_tokens} probe tokens from {result.n_texts} texts ({result.probe_source}); "
             f"folded checkpoint dtype {result.checkpoint_dtype}; compared in float32.", "",
             "| figure | value | limit |", "|---|---|---|",
             f"| max abs logit diff | {result.max_abs_logit_diff:.3g} | ≤ {th['max_abs_logit_diff']:g} |",
             f"| mean KL | {result.mean_kl:.3g} | ≤ {th['max_mean_kl']:g} |",
             f"| max KL | {result.max_kl:.3g} | |",
             f"| top-1 agreement | {result.top1_agreement:.4f} | ≥ {th['min_top1']:g} |",
             f"| min hidden cosine (h·Qᵀ) | {result.hidden_cosine_min:.8f} | ≥ {th['min_hidden_cosine']:g} |"]
    if result.failures:
        lines += ["", "Failures: " + "; ".join(result.failures)]
    return "\n".join(lines) + "\n"
