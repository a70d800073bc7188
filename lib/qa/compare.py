"""QA metrics of a checkpoint variant against the teacher, streamed from captured shards.

    tourguide qa --config deployments/eval_template.json     (the nightly flow; see flows/qa.py)

Samples are paired by text sha256 and tokens by position (both captures must hold the same
token ids on their common prefix: a different tokenizer is refused). Everything accumulates
in float64 whatever the shard dtype, one sample at a time (memory: one sample's tensors).

Metrics (ledger names; every value is a mean over the tokens behind it, `n_tokens`):

- `logit_kl`            KL(teacher ‖ variant) of the next-token distributions at every real token,
                        nats; also one row per sample (`sample` = its sample id).
- `hidden_state_cosine` per layer: mean token cosine of teacher residual y and T(x), x the variant
                        residual and T its transports (rotation x @ Q, PCA adapter, permutation) —
                        never raw coordinates of a rotated model. Residual = decoder block output,
                        so the last block's is taken before the final norm.
- `residual_rms`        per layer: sqrt(mean x²) of the variant's own residual; and
  `residual_rms_ratio`  that over the teacher's on the same tokens.
- `surprisal`           mean −log p(token | prefix) over the text's tokens after the first, nats/token
                        (also per sample); `perplexity` = exp(surprisal).

`measure_capture` gives a model's own surprisal / perplexity / residual_rms (the teacher's rows).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from lib.core.errors import BadInputError
from lib.core.options import Frozen, Model
from lib.qa.metric_names import LOGIT_METRICS, METRICS, is_residual_layer, layer_sort_key
from lib.qa.token_metrics import compute_token_cosine, compute_token_kl, compute_token_surprisal
from lib.qa.transports import chain_widths, load_transport
from lib.store.shards import ACT_PREFIX, ShardRecord, load_shard, read_index, resolve_index_path
from lib.store.validation import require_valid


class MetricValue(Frozen):
    """One number for the ledger: mean over `n_tokens` tokens; `layer` / `sample` or None."""

    metric: str
    value: float
    n_tokens: int
    layer: str | None = None
    sample: str | None = None


class Comparison(Model):
    """What `compare_captures` found: the values and how the samples paired."""

    values: list[MetricValue]
    n_pairs: int
    n_unpaired_teacher: int
    n_unpaired_variant: int
    layers: list[str]
    n_tokens: int
    notes: list[str] = []


def _records(index: str | os.PathLike, verify: bool) -> tuple[Path, list[ShardRecord]]:
    path = resolve_index_path(index)
    if verify:
        require_valid([path])
    rows = read_index(path)
    if not rows:
        raise BadInputError(f"{path}: index has no shards; capture first")
    return path.parent, rows


def _width(rec: ShardRecord, name: str, where: Path) -> int:
    shape = rec.shapes.get(name)
    if shape is None or len(shape) != 2:
        raise BadInputError(f"{where / rec.shard}: tensor {name!r} missing or not [T, d] (shapes {rec.shapes})")
    return shape[1]


def _common_layers(t_rows: Sequence[ShardRecord], v_rows: Sequence[ShardRecord], layers: Sequence[str] | None,
                   t_dir: Path, v_dir: Path) -> list[str]:
    t_layers = set.intersection(*(set(r.layers) for r in t_rows))
    v_layers = set.intersection(*(set(r.layers) for r in v_rows))
    if layers:
        for side, have, d in (("teacher", t_layers, t_dir), ("variant", v_layers, v_dir)):
            missing = [x for x in layers if x not in have]
            if missing:
                raise BadInputError(f"{d}: the {side} capture lacks layer(s) {missing} in some shard; it has "
                                    f"{sorted(have, key=layer_sort_key)}; capture them (or drop them from `layers`)")
        return list(layers)
    common = sorted((x for x in t_layers & v_layers if is_residual_layer(x)), key=layer_sort_key)
    if not common:
        raise BadInputError(f"{t_dir} and {v_dir}: no decoder-block residual (model.layers.N) captured on both sides; "
                            "capture with the default hook points")
    return common


def _need_logits(rows: Sequence[ShardRecord], where: Path, metrics: Sequence[str]) -> None:
    bad = [r.shard for r in rows if "logits" not in r.shapes]
    if bad:
        raise BadInputError(f"{where}: {len(bad)} shard(s) lack logits ({bad[:3]}…) but {list(metrics)} need them; "
                            "capture with --logits")


def _pair(t_rows: Sequence[ShardRecord], v_rows: Sequence[ShardRecord]) -> list[tuple[ShardRecord, ShardRecord]]:
    by_text: dict[str, ShardRecord] = {}
    for r in v_rows:
        by_text.setdefault(r.text_sha256, r)
    seen: set[str] = set()
    pairs = []
    for r in t_rows:
        if r.text_sha256 in by_text and r.text_sha256 not in seen:
            seen.add(r.text_sha256)
            pairs.append((r, by_text[r.text_sha256]))
    return pairs


def compare_captures(teacher_index: str | os.PathLike, variant_index: str | os.PathLike,
                     metrics: Sequence[str] = METRICS, transports: Sequence[tuple[str, str]] = (),
                     layers: Sequence[str] | None = None, verify: bool = True) -> Comparison:
    """Stream every paired sample of two captures once; return the ledger values.

    `transports`: (kind, path) pairs applied in order to the variant's residuals before the
    cosine. `layers`: residual hook points to compare (default: every decoder block captured
    on both sides). `verify` re-hashes the shards first (the QA flow validates in its own task).
    Raises BadInputError for missing tensors, widths the transports do not bridge, different
    vocabularies, different token ids or no paired sample.
    """
    import torch

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise BadInputError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")
    t_dir, t_rows = _records(teacher_index, verify)
    v_dir, v_rows = _records(variant_index, verify)
    pairs = _pair(t_rows, v_rows)
    if not pairs:
        raise BadInputError(f"{t_dir} and {v_dir} share no sample (paired by text sha256); capture both over the "
                            "same dataset snapshot")
    want_logits = [m for m in metrics if m in LOGIT_METRICS]
    if want_logits:
        _need_logits([v for _, v in pairs], v_dir, want_logits)
    if "logit_kl" in metrics:  # surprisal alone needs only the variant's logits
        _need_logits([t for t, _ in pairs], t_dir, ["logit_kl"])
        vt, vv = pairs[0][0].shapes["logits"][1], pairs[0][1].shapes["logits"][1]
        if vt != vv:
            raise BadInputError(f"vocabularies differ: teacher logits have {vt} entries, the variant's {vv}; KL and "
                                "surprisal need one vocabulary (same tokenizer family)")
    want_layers = "hidden_state_cosine" in metrics or "residual_rms" in metrics
    use_layers = _common_layers([t for t, _ in pairs], [v for _, v in pairs], layers, t_dir, v_dir) if want_layers else []
    chain = [load_transport(k, p) for k, p in transports] if "hidden_state_cosine" in metrics else []
    for layer in use_layers:
        dt = {_width(t, ACT_PREFIX + layer, t_dir) for t, _ in pairs}
        dv = {_width(v, ACT_PREFIX + layer, v_dir) for _, v in pairs}
        if len(dt) > 1 or len(dv) > 1:
            raise BadInputError(f"layer {layer}: residual width varies between shards ({sorted(dt)} / {sorted(dv)})")
        if "hidden_state_cosine" in metrics:
            chain_widths(chain, dv.pop(), dt.pop(), f"layer {layer}")
            for tr in chain:
                tr.check_layer(layer)

    acc = _Sums(use_layers)
    per_sample: list[MetricValue] = []
    acts = [ACT_PREFIX + x for x in use_layers]
    t_names = ["input_ids"] + (["logits"] if "logit_kl" in metrics else []) + acts
    v_names = ["input_ids"] + (["logits"] if want_logits else []) + acts
    for t_rec, v_rec in pairs:
        tt, _ = load_shard(t_dir / t_rec.shard, t_names)
        vv, _ = load_shard(v_dir / v_rec.shard, v_names)
        n = min(t_rec.n_tokens, v_rec.n_tokens, tt["input_ids"].numel(), vv["input_ids"].numel())
        ids = tt["input_ids"][:n]
        if not torch.equal(ids, vv["input_ids"][:n]):
            at = int((ids != vv["input_ids"][:n]).nonzero()[0, 0])
            raise BadInputError(f"sample {t_rec.sample_id}: token ids differ at position {at} between {t_dir / t_rec.shard} "
                                f"and {v_dir / v_rec.shard}; compare captures made with the same tokenizer")
        acc.n_tokens += n
        if "logit_kl" in metrics:
            kl = compute_token_kl(tt["logits"][:n], vv["logits"][:n])
            s = float(kl.sum())
            acc.kl += s
            per_sample.append(MetricValue(metric="logit_kl", value=s / n, n_tokens=n, sample=t_rec.sample_id))
        if "surprisal" in metrics:
            sp = compute_token_surprisal(vv["logits"][:n], ids)
            acc.nll += float(sp.sum())
            acc.n_targets += sp.numel()
            if sp.numel():
                per_sample.append(MetricValue(metric="surprisal", value=float(sp.mean()), n_tokens=sp.numel(), sample=t_rec.sample_id))
        for layer in use_layers:
            y = tt[ACT_PREFIX + layer][:n].to(torch.float64)
            x = vv[ACT_PREFIX + layer][:n].to(torch.float64)
            if "residual_rms" in metrics:
                acc.sq_v[layer] += float((x * x).sum())
                acc.sq_t[layer] += float((y * y).sum())
                acc.el_v[layer] += x.numel()
                acc.el_t[layer] += y.numel()
            if "hidden_state_cosine" in metrics:
                for tr in chain:
                    x = tr.apply(x, layer)
                acc.cos[layer] += float(compute_token_cosine(x, y).sum())
    values = acc.values(metrics) + per_sample
    n_t = len({r.text_sha256 for r in t_rows}) - len(pairs)
    n_v = len({r.text_sha256 for r in v_rows}) - len(pairs)
    notes = [f"{n_t} teacher sample(s) without a variant capture"] if n_t else []
    notes += [f"{n_v} variant sample(s) without a teacher capture"] if n_v else []
    return Comparison(values=values, n_pairs=len(pairs), n_unpaired_teacher=n_t, n_unpaired_variant=n_v, layers=use_layers,
                      n_tokens=acc.n_tokens, notes=notes)


class _Sums:
    """float64 (Python float) running sums behind every mean."""

    def __init__(self, layers: Sequence[str]) -> None:
        self.layers = list(layers)
        self.n_tokens = 0
        self.kl = self.nll = 0.0
        self.n_targets = 0
        self.cos = dict.fromkeys(layers, 0.0)
        self.sq_v, self.sq_t = dict.fromkeys(layers, 0.0), dict.fromkeys(layers, 0.0)
        self.el_v, self.el_t = dict.fromkeys(layers, 0), dict.fromkeys(layers, 0)

    def values(self, metrics: Sequence[str], teacher_only: bool = False) -> list[MetricValue]:
        n = self.n_tokens
        out: list[MetricValue] = []
        if "logit_kl" in metrics and not teacher_only:
            out.append(MetricValue(metric="logit_kl", value=self.kl / n, n_tokens=n))
        if "surprisal" in metrics and self.n_targets:
            mean = self.nll / self.n_targets
            out += [MetricValue(metric="surprisal", value=mean, n_tokens=self.n_targets),
                    MetricValue(metric="perplexity", value=math.exp(mean), n_tokens=self.n_targets)]
        for layer in self.layers:
            if "hidden_state_cosine" in metrics and not teacher_only:
                out.append(MetricValue(metric="hidden_state_cosine", value=self.cos[layer] / n, n_tokens=n, layer=layer))
            if "residual_rms" in metrics:
                rv = math.sqrt(self.sq_v[layer] / self.el_v[layer])
                out.append(MetricValue(metric="residual_rms", value=rv, n_tokens=n, layer=layer))
                if not teacher_only:
                    rt = math.sqrt(self.sq_t[layer] / self.el_t[layer])
                    out.append(MetricValue(metric="residual_rms_ratio", value=rv / rt if rt > 0 else float("nan"), n_tokens=n,
                                               layer=layer))
        return out


def measure_capture(index: str | os.PathLike, metrics: Sequence[str] = METRICS,
                    layers: Sequence[str] | None = None, verify: bool = True) -> Comparison:
    """A model's own metrics over its capture: surprisal (+ per sample), perplexity and
    residual_rms per layer (what the report shows for the teacher). KL and cosine need a pair."""
    import torch

    folder, rows = _records(index, verify)
    want_logits = "surprisal" in metrics
    if want_logits:
        _need_logits(rows, folder, ["surprisal"])
    use_layers: list[str] = []
    if "residual_rms" in metrics:
        use_layers = _common_layers(rows, rows, layers, folder, folder)
    acc = _Sums(use_layers)
    per_sample: list[MetricValue] = []
    names = ["input_ids"] + (["logits"] if want_logits else []) + [ACT_PREFIX + x for x in use_layers]
    seen: set[str] = set()
    for rec in rows:
        if rec.text_sha256 in seen:
            continue
        seen.add(rec.text_sha256)
        tt, _ = load_shard(folder / rec.shard, names)
        acc.n_tokens += rec.n_tokens
        if want_logits:
            sp = compute_token_surprisal(tt["logits"], tt["input_ids"])
            acc.nll += float(sp.sum())
            acc.n_targets += sp.numel()
            if sp.numel():
                per_sample.append(MetricValue(metric="surprisal", value=float(sp.mean()), n_tokens=sp.numel(), sample=rec.sample_id))
        for layer in use_layers:
            x = tt[ACT_PREFIX + layer].to(torch.float64)
            acc.sq_v[layer] += float((x * x).sum())
            acc.el_v[layer] += x.numel()
    return Comparison(values=acc.values(metrics, teacher_only=True) + per_sample, n_pairs=len(seen), n_unpaired_teacher=0,
                      n_unpaired_variant=0, layers=use_layers, n_tokens=acc.n_tokens)
