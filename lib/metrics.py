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

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lib.errors import BadInputError
from lib.shards import ACT_PREFIX, ShardRecord, load_shard, read_index, require_valid, resolve_index_path

METRICS_VERSION = "1"
METRICS = ("logit_kl", "hidden_state_cosine", "residual_rms", "surprisal")
LOGIT_METRICS = ("logit_kl", "surprisal")
LAYER_METRICS = ("hidden_state_cosine", "residual_rms", "residual_rms_ratio")
# Every ledger metric name, in report order.
LEDGER_METRICS = ("logit_kl", "surprisal", "perplexity", "hidden_state_cosine", "residual_rms", "residual_rms_ratio")
_BLOCK = re.compile(r"^(?:.*\.)?layers\.(\d+)$")
_KL_CHUNK_ELEMENTS = 1 << 22  # rows x vocab per float64 chunk (32 MiB): bounds memory for 150k vocabularies


def layer_sort_key(layer: str) -> tuple[int, str]:
    m = _BLOCK.match(layer)
    return (int(m.group(1)) if m else 1 << 30, layer)


def is_residual_layer(hook_point: str) -> bool:
    """Decoder block outputs (`model.layers.3`) are residuals; sub-modules and inputs are not."""
    return _BLOCK.match(hook_point) is not None


# ----------------------------------------------------------------------------------------------
# per-token metrics (float64)
# ----------------------------------------------------------------------------------------------
def _f64(x: Any):
    import torch

    return torch.as_tensor(x).to(torch.float64)


def compute_token_kl(teacher_logits: Any, variant_logits: Any):
    """KL(p_teacher ‖ p_variant) per position, nats. Inputs [T, V] (any float dtype, torch or numpy);
    returns float64 [T]. Computed in float64 in row chunks of bounded size."""
    import torch

    t_all, v_all = torch.as_tensor(teacher_logits), torch.as_tensor(variant_logits)
    if t_all.shape != v_all.shape or t_all.ndim != 2:
        raise BadInputError(f"logits must both be [T, V] of one shape, got {list(t_all.shape)} and {list(v_all.shape)}")
    rows = max(1, _KL_CHUNK_ELEMENTS // max(t_all.shape[1], 1))
    out = []
    for i in range(0, t_all.shape[0], rows):
        lt = torch.log_softmax(t_all[i:i + rows].to(torch.float64), dim=-1)
        lv = torch.log_softmax(v_all[i:i + rows].to(torch.float64), dim=-1)
        pt = lt.exp()
        # p_t = 0 terms contribute 0 (also where both log-probs are -inf, which would give nan)
        out.append(torch.where(pt > 0, pt * (lt - lv), torch.zeros((), dtype=torch.float64)).sum(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def compute_token_surprisal(logits: Any, input_ids: Any):
    """−log p(ids[t+1] | ids[≤t]) for t = 0..T−2, nats. logits [T, V], input_ids [T] int → float64 [T−1]."""
    import torch

    lg, ids = torch.as_tensor(logits), torch.as_tensor(input_ids).to(torch.long)
    if lg.ndim != 2 or ids.ndim != 1 or lg.shape[0] != ids.shape[0]:
        raise BadInputError(f"surprisal needs logits [T, V] and input_ids [T], got {list(lg.shape)} and {list(ids.shape)}")
    if lg.shape[0] < 2:
        return torch.zeros(0, dtype=torch.float64)
    targets = ids[1:]
    if int(targets.max()) >= lg.shape[1] or int(targets.min()) < 0:
        raise BadInputError(f"a token id is outside the logits' vocabulary of {lg.shape[1]}")
    rows = max(1, _KL_CHUNK_ELEMENTS // max(lg.shape[1], 1))
    out = []
    for i in range(0, lg.shape[0] - 1, rows):
        lp = torch.log_softmax(lg[i:min(i + rows, lg.shape[0] - 1)].to(torch.float64), dim=-1)
        out.append(-lp.gather(1, targets[i:i + lp.shape[0], None]).squeeze(1))
    return torch.cat(out)


def compute_token_cosine(a: Any, b: Any):
    """cos(a_t, b_t) per row, float64 [T]; rows where either norm is 0 count as 0. a, b [T, d]."""
    import torch

    a, b = _f64(a), _f64(b)
    if a.shape != b.shape or a.ndim != 2:
        raise BadInputError(f"cosine needs two [T, d] tensors of one shape, got {list(a.shape)} and {list(b.shape)}")
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros((), dtype=torch.float64))


def compute_rms(h: Any) -> float:
    """sqrt(mean of h²) over all elements, float64. h [T, d]."""
    h = _f64(h)
    return math.sqrt(float((h * h).sum()) / h.numel()) if h.numel() else float("nan")


# ----------------------------------------------------------------------------------------------
# transports: the variant's residual basis → the teacher's
# ----------------------------------------------------------------------------------------------
@dataclass
class Transport:
    """One loaded map x [n, d_in] ↦ [n, d_out] (float64). `apply(x, layer)`.

    rotation: x @ Q; permutation: x[:, perm]; pca_adapter: (x − μ_in) @ P + μ_out with
    P = projection, or B_s R_k B_tᵀ from the bases (R_k = I when absent); means are [d] or
    per layer [L, d] (row = position of the layer in the file's `layers` metadata)."""

    kind: str
    path: str
    d_in: int
    d_out: int
    matrix: Any = None  # torch float64 [d_in, d_out] (rotation / PCA projection)
    perm: Any = None  # torch int64 [d]
    mean_in: Any = None  # None, [d_in] or [L, d_in]
    mean_out: Any = None
    layers: tuple[str, ...] = ()

    def _mean(self, mean: Any, layer: str):
        if mean is None or mean.ndim == 1:
            return mean
        return mean[self.layers.index(layer)]

    def check_layer(self, layer: str) -> None:
        per_layer = any(m is not None and m.ndim == 2 for m in (self.mean_in, self.mean_out))
        if per_layer and layer not in self.layers:
            raise BadInputError(f"{self.path}: per-layer means cover {list(self.layers)}, not {layer!r}; "
                                "solve the adapter over the layers you compare (or drop that layer)")

    def apply(self, x: Any, layer: str):
        if self.kind == "permutation":
            return x[:, self.perm]
        mi, mo = self._mean(self.mean_in, layer), self._mean(self.mean_out, layer)
        y = (x - mi if mi is not None else x) @ self.matrix
        return y + mo if mo is not None else y


def _load_safetensors(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except FileNotFoundError:
        raise BadInputError(f"{path}: transport file not found") from None
    except Exception as exc:  # safetensors raises its own types for a bad header
        raise BadInputError(f"{path}: not a readable safetensors file ({exc.__class__.__name__}: {str(exc)[:120]})") from None


def load_transport(kind: str, path: str | os.PathLike) -> Transport:
    """Read one transport file (see `Transport`); BadInputError names the file, tensor and shape."""
    import torch

    path = str(path)
    t, meta = _load_safetensors(path)

    def need(name: str, ndim: int):
        if name not in t:
            raise BadInputError(f"{path}: a {kind} file needs tensor {name!r}; it holds {sorted(t)}")
        x = t[name]
        if x.ndim != ndim:
            raise BadInputError(f"{path}: tensor {name!r} must be {ndim}-D, got shape {list(x.shape)}")
        return x

    if kind == "rotation":
        q = need("rotation", 2).to(torch.float64)
        return Transport(kind, path, q.shape[0], q.shape[1], matrix=q)
    if kind == "permutation":
        p = need("permutation", 1).to(torch.long)
        if sorted(p.tolist()) != list(range(p.numel())):
            raise BadInputError(f"{path}: 'permutation' [{p.numel()}] is not a permutation of 0..{p.numel() - 1}")
        return Transport(kind, path, p.numel(), p.numel(), perm=p)
    if kind != "pca_adapter":
        raise BadInputError(f"{path}: unknown transport kind {kind!r}; use rotation, pca_adapter or permutation")
    if "projection" in t:
        m = need("projection", 2).to(torch.float64)
    else:
        bs, bt = need("student_basis", 2).to(torch.float64), need("teacher_basis", 2).to(torch.float64)
        k = bs.shape[1]
        rk = t["k_rotation"].to(torch.float64) if "k_rotation" in t else torch.eye(k, dtype=torch.float64)
        if bt.shape[1] != k or rk.shape != (k, k):
            raise BadInputError(f"{path}: student_basis {list(bs.shape)}, k_rotation {list(rk.shape)} and teacher_basis "
                                f"{list(bt.shape)} disagree on k")
        m = bs @ rk @ bt.T
    layers: tuple[str, ...] = ()
    if "layers" in meta:
        try:
            layers = tuple(json.loads(meta["layers"]))
        except (json.JSONDecodeError, TypeError):
            raise BadInputError(f"{path}: metadata 'layers' is not a JSON list of layer names") from None
    tr = Transport(kind, path, m.shape[0], m.shape[1], matrix=m, layers=layers)
    for name, width, attr in (("student_mean", m.shape[0], "mean_in"), ("teacher_mean", m.shape[1], "mean_out")):
        if name not in t:
            continue
        mean = t[name].to(torch.float64)
        if mean.shape[-1] != width or mean.ndim not in (1, 2) or (mean.ndim == 2 and mean.shape[0] != len(layers)):
            raise BadInputError(f"{path}: {name!r} has shape {list(mean.shape)}; expected [{width}] or "
                                f"[{len(layers)} layers (metadata 'layers'), {width}]")
        setattr(tr, attr, mean)
    return tr


def chain_widths(transports: Sequence[Transport], d_variant: int, d_teacher: int, where: str) -> None:
    """The chain must take the variant's width to the teacher's, link by link."""
    d = d_variant
    for t in transports:
        if t.d_in != d:
            raise BadInputError(f"{where}: transport {t.kind} {t.path} expects residual width {t.d_in}, but the "
                                f"{'variant' if t is transports[0] else 'previous transport'} gives {d}")
        d = t.d_out
    if d != d_teacher:
        hint = "give a pca_adapter transport" if not transports else "check the transport files"
        raise BadInputError(f"{where}: residual width after transports is {d}, the teacher's is {d_teacher}; "
                            f"cosines need one basis: {hint}")


# ----------------------------------------------------------------------------------------------
# streaming a variant against the teacher
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricValue:
    """One number for the ledger: mean over `n_tokens` tokens; `layer` / `sample` or None."""

    metric: str
    value: float
    n_tokens: int
    layer: str | None = None
    sample: str | None = None


@dataclass
class Comparison:
    """What `compare_captures` found: the values and how the samples paired."""

    values: list[MetricValue]
    n_pairs: int
    n_unpaired_teacher: int
    n_unpaired_variant: int
    layers: list[str]
    n_tokens: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "values": [asdict(v) for v in self.values]}


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
            per_sample.append(MetricValue("logit_kl", s / n, n, sample=t_rec.sample_id))
        if "surprisal" in metrics:
            sp = compute_token_surprisal(vv["logits"][:n], ids)
            acc.nll += float(sp.sum())
            acc.n_targets += sp.numel()
            if sp.numel():
                per_sample.append(MetricValue("surprisal", float(sp.mean()), sp.numel(), sample=t_rec.sample_id))
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
    return Comparison(values, len(pairs), n_t, n_v, use_layers, acc.n_tokens, notes)


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
            out.append(MetricValue("logit_kl", self.kl / n, n))
        if "surprisal" in metrics and self.n_targets:
            mean = self.nll / self.n_targets
            out += [MetricValue("surprisal", mean, self.n_targets), MetricValue("perplexity", math.exp(mean), self.n_targets)]
        for layer in self.layers:
            if "hidden_state_cosine" in metrics and not teacher_only:
                out.append(MetricValue("hidden_state_cosine", self.cos[layer] / n, n, layer))
            if "residual_rms" in metrics:
                rv = math.sqrt(self.sq_v[layer] / self.el_v[layer])
                out.append(MetricValue("residual_rms", rv, n, layer))
                if not teacher_only:
                    rt = math.sqrt(self.sq_t[layer] / self.el_t[layer])
                    out.append(MetricValue("residual_rms_ratio", rv / rt if rt > 0 else float("nan"), n, layer))
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
                per_sample.append(MetricValue("surprisal", float(sp.mean()), sp.numel(), sample=rec.sample_id))
        for layer in use_layers:
            x = tt[ACT_PREFIX + layer].to(torch.float64)
            acc.sq_v[layer] += float((x * x).sum())
            acc.el_v[layer] += x.numel()
    return Comparison(acc.values(metrics, teacher_only=True) + per_sample, len(seen), 0, 0, use_layers, acc.n_tokens)


# ----------------------------------------------------------------------------------------------
# ledger rows
# ----------------------------------------------------------------------------------------------
def metric_rows(values: Sequence[MetricValue], *, run_id: str, night: str, timestamp: str, variant: str,
                snapshot_digest: str, code_version: str) -> list[dict[str, Any]]:
    """Rows of the `metrics` ledger (lib.ledgers.SCHEMAS['metrics'])."""
    return [{"run_id": run_id, "night": night, "timestamp": timestamp, "variant": variant, "metric": v.metric,
             "layer": v.layer, "sample": v.sample, "value": float(v.value), "n_tokens": int(v.n_tokens),
             "snapshot_digest": snapshot_digest, "code_version": code_version} for v in values]


def code_version(git_commit: str) -> str:
    """What produced a metrics row: the project commit (short) and METRICS_VERSION."""
    return f"{git_commit[:12]}+metrics{METRICS_VERSION}"


@dataclass(frozen=True)
class RecordContext:
    """Where and under which labels QA rows go (one per QA night)."""

    run_dir: str
    run_id: str
    night: str
    timestamp: str
    snapshot_digest: str
    code_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecordContext:
        return cls(**d)


def record_metrics(ctx: RecordContext, variant: str, teacher_index: str, variant_index: str | None = None,
                   metrics: Sequence[str] = METRICS, transports: Sequence[tuple[str, str]] = (),
                   layers: Sequence[str] | None = None, verify: bool = False) -> dict[str, Any]:
    """Compute (`compare_captures`, or `measure_capture` when `variant_index` is None: the
    teacher's own rows) and append the rows to the run's metrics ledger. Returns a small summary:
    {variant, n_rows, n_pairs, n_tokens, notes, ledger_file, headline: {metric: value}}."""
    from lib.ledgers import append_rows, ledger_path

    if variant_index is None:
        result = measure_capture(teacher_index, metrics, layers, verify)
    else:
        result = compare_captures(teacher_index, variant_index, metrics, transports, layers, verify)
    rows = metric_rows(result.values, run_id=ctx.run_id, night=ctx.night, timestamp=ctx.timestamp, variant=variant,
                       snapshot_digest=ctx.snapshot_digest, code_version=ctx.code_version)
    written = append_rows(ledger_path(ctx.run_dir, "metrics"), "metrics", rows)
    headline: dict[str, float] = {}
    for v in result.values:
        if v.sample is None:
            key = v.metric if v.layer is None else f"{v.metric}[{v.layer}]"
            headline[key] = v.value
    return {"variant": variant, "n_rows": len(rows), "n_pairs": result.n_pairs, "n_tokens": result.n_tokens,
            "layers": result.layers, "notes": result.notes, "ledger_file": str(written), "headline": headline}


# ----------------------------------------------------------------------------------------------
# one QA night
# ----------------------------------------------------------------------------------------------
def prepare_qa(config: Mapping[str, Any], night: str | None = None) -> dict[str, Any]:
    """Check that the config's run is scaffolded and its corpus unchanged; fix the night's labels.

    `config` is `EvalConfig.to_dict()`. Returns `RecordContext.to_dict()` plus "sample_files"
    (the snapshot's sample files, to capture), "metric_layers" (the residual hook points among
    the config's `layers`, None = every decoder block) and "logits" (whether a metric needs them)."""
    from datetime import datetime, timezone

    from lib.eval_config import config_from_dict
    from lib.runs import project_commit, verify_snapshot

    cfg = config_from_dict(config)
    if night is not None and (not isinstance(night, str) or not night.strip() or len(night) > 64):
        raise BadInputError(f"night label {night!r}: give a short non-empty label such as 2026-11-27")
    info = verify_snapshot(cfg.runs_root, cfg.run_id)
    # microseconds: two QA runs in one second must still order (the report keeps the latest per night)
    stamp = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    ctx = RecordContext(info.run_dir, cfg.run_id, night or stamp[:10], stamp, info.snapshot_digest,
                        code_version(project_commit()))
    # Residual metrics only make sense at decoder-block outputs, whatever else is captured.
    metric_layers = [x for x in cfg.layers if is_residual_layer(x)]  # eval_config checked there is one
    return {**ctx.to_dict(), "sample_files": list(info.sample_files), "metric_layers": metric_layers or None,
            "logits": any(m in LOGIT_METRICS for m in cfg.metrics)}
