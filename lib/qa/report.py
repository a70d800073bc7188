"""The QA report of a run: report.md + seaborn figures, from manifest.json and the ledgers.

    tourguide report --run-id nightly --runs-root runs

Reads `runs/<id>/manifest.json`, the `metrics` ledger (and the rotations ledger, JSONL at
`rotations.jsonl` and/or parquet under `ledgers/rotations/`, when it has rows) and writes:

    runs/<id>/report.md                       summary (variant × metric) for the latest night, per-layer
                                              tables, what changed since the previous night, figures
    runs/<id>/figures/metric_trends.png       summary metrics across nights (and across runs over the
                                              same dataset snapshot under the same runs root)
    runs/<id>/figures/cosine_per_layer.png    per-layer cosine to the teacher: QA (after each variant's
                                              transports) and, from the rotations ledger, before/after rotation
    runs/<id>/figures/residual_rms.png        residual RMS per layer (+ ratio to the teacher)

Within a night the latest QA rows of each variant win (a re-run the same night replaces them).
Figures use matplotlib's Agg backend (no display needed); every file is written atomically.
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import model_serializer

from lib.core.options import Model
from lib.qa.metric_names import SUMMARY_METRICS, LAYER_METRICS, layer_sort_key
from lib.qa.plots import plot_cosines, plot_rms, plot_trends
from lib.qa.provenance import checkpoint_rows, provenance_rows, read_models, short_revision
from lib.store.atomic import write_text_atomic
from lib.store.runs import ROTATIONS_LEDGER, load_run

REPORT_NAME = "report.md"


# Per-layer metrics appear in the summary as their mean over layers.
SUMMARY_LABELS = {"hidden_state_cosine": "hidden_state_cosine (layer mean)",
                  "residual_rms_ratio": "residual_rms_ratio (layer mean)"}


FIGURES = {"trends": "metric_trends.png", "cosine": "cosine_per_layer.png", "rms": "residual_rms.png"}


# Per-layer tables show at most this many variants side by side (more: several tables). Prefect's
# UI lets a wide markdown table run under its side panel; the full table is a table artifact.
MAX_VARIANT_COLUMNS = 4


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)] or [[]]


class ReportResult(Model):
    """What the report shows (posted as artifacts). `model_dump(mode="json")` turns NaN/inf into
    None and numpy scalars into Python numbers: JSON and Prefect table artifacts reject them."""

    report_path: str
    run_id: str
    latest_night: str | None
    previous_night: str | None
    figures: dict[str, str] = {}  # kind -> path (only those drawn)
    summary: list[dict[str, Any]] = []  # one row per variant: {variant, <metric>: value}
    per_layer: dict[str, list[dict[str, Any]]] = {}  # metric -> rows {layer, <variant>: value}
    changes: list[dict[str, Any]] = []
    n_rows: int = 0

    @model_serializer(mode="plain")
    def _dump(self, info: Any) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in type(self).model_fields}
        return _jsonable(data) if info.mode_is_json() else data


def _jsonable(obj: Any) -> Any:
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def fmt(value: Any) -> str:
    """How numbers appear in report.md (6 significant digits; '—' for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def load_metrics(run_dir: str | os.PathLike, run_id: str):
    """The run's metrics rows, keeping only the latest QA rows per (night, variant)."""
    from lib.store.ledgers import ledger_path, read_ledger

    df = read_ledger(ledger_path(run_dir, "metrics"), "metrics")
    df = df[df.run_id == run_id]
    if df.empty:
        return df
    latest = df.groupby(["night", "variant"]).timestamp.transform("max")
    return df[df.timestamp == latest].reset_index(drop=True)


def night_order(df) -> list[str]:
    """Nights ordered by when they were recorded (labels need not sort as strings)."""
    if df.empty:
        return []
    return list(df.groupby("night").timestamp.max().sort_values().index)


def variant_order(df) -> list[str]:
    """Variants in the order QA wrote them (teacher first)."""
    return list(df.sort_values("timestamp", kind="stable").variant.drop_duplicates())


def summary_values(night_df) -> dict[str, dict[str, float]]:
    """variant -> {summary metric: value}: scalar rows as they are, layer metrics averaged over layers."""
    out: dict[str, dict[str, float]] = {}
    whole = night_df[night_df["sample"].isna()]
    for variant, g in whole.groupby("variant", sort=False):
        vals: dict[str, float] = {}
        for metric in SUMMARY_METRICS:
            rows = g[g.metric == metric]
            if rows.empty:
                continue
            if metric in LAYER_METRICS:
                rows = rows[rows.layer.notna()]
                if not rows.empty:
                    vals[metric] = float(rows.value.mean())
            elif rows.layer.isna().any():
                vals[metric] = float(rows[rows.layer.isna()].value.iloc[-1])
        out[str(variant)] = vals
    return out


def per_layer_values(night_df, metric: str) -> dict[str, dict[str, float]]:
    """layer -> {variant: value} for one per-layer metric."""
    rows = night_df[(night_df.metric == metric) & night_df.layer.notna() & night_df["sample"].isna()]
    out: dict[str, dict[str, float]] = {}
    for r in rows.itertuples():
        out.setdefault(str(r.layer), {})[str(r.variant)] = float(r.value)
    return dict(sorted(out.items(), key=lambda kv: layer_sort_key(kv[0])))


def load_rotations(run_dir: str | os.PathLike):
    """Rows of the run's rotations ledger(s) from the latest rotate run, or an empty frame."""
    import pandas as pd

    from lib.store.ledgers import ledger_path, read_ledger

    run_dir = Path(run_dir)
    frames = [read_ledger(run_dir / ROTATIONS_LEDGER, "rotations"), read_ledger(ledger_path(run_dir, "rotations"), "rotations")]
    if all(f.empty for f in frames):
        return frames[0]
    df = pd.concat([f for f in frames if not f.empty], ignore_index=True)
    last = df.sort_values("recorded_at", kind="stable").run_id.iloc[-1]
    df = df[df.run_id == last]
    return df.iloc[sorted(range(len(df)), key=lambda i: layer_sort_key(str(df.layer.iloc[i])))].reset_index(drop=True)


def trend_frame(runs_root: str | os.PathLike, run_id: str, snapshot_digest: str):
    """Long frame [point, order, run_id, night, variant, metric, value] of summary values per night,
    for this run and every other run under `runs_root` measured on the same dataset snapshot."""
    import pandas as pd

    frames = []
    root = Path(runs_root)
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != run_id) if root.is_dir() else []
    for rid in [run_id, *others]:
        if rid == run_id:
            df = load_metrics(root / rid, rid)
        else:
            try:
                df = load_metrics(root / rid, rid)
            except Exception:  # another run's unreadable ledger is not this report's problem
                continue
            df = df[df.snapshot_digest == snapshot_digest]
        if df.empty:
            continue
        for night in night_order(df):
            nd = df[df.night == night]
            stamp = nd.timestamp.max()
            for variant, vals in summary_values(nd).items():
                for metric, value in vals.items():
                    frames.append({"run_id": rid, "night": night, "stamp": stamp, "variant": variant,
                                   "metric": metric, "value": value})
    tf = pd.DataFrame(frames, columns=["run_id", "night", "stamp", "variant", "metric", "value"])
    if tf.empty:
        return tf
    many_runs = tf.run_id.nunique() > 1
    tf["point"] = [f"{r}:{n}" if many_runs else n for r, n in zip(tf.run_id, tf.night, strict=True)]
    order = {p: i for i, p in enumerate(tf.sort_values("stamp", kind="stable").point.drop_duplicates())}
    tf["order"] = tf.point.map(order)
    return tf.sort_values(["order", "variant"], kind="stable").reset_index(drop=True)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return fmt(x).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def change_cell(c: Mapping[str, Any]) -> str:
    """'0.25 (+125.00%)': the delta and, when defined, its size relative to the previous night."""
    if c["delta"] is None:
        return "—"
    return fmt(c["delta"]) + ("" if c["relative"] is None else f" ({100 * c['relative']:+.2f}%)")


def compare_nights(now: Mapping[str, Mapping[str, float]], before: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """One row per (variant, summary metric) present either night: previous, latest, delta, status."""
    rows = []
    for variant in list(now) + [v for v in before if v not in now]:
        for metric in SUMMARY_METRICS:
            a, b = before.get(variant, {}).get(metric), now.get(variant, {}).get(metric)
            if a is None and b is None:
                continue
            if a is None:
                status, delta, rel = "new", None, None
            elif b is None:
                status, delta, rel = "missing tonight", None, None
            else:
                delta = b - a
                rel = delta / abs(a) if a else None
                status = "unchanged" if delta == 0 else ("up" if delta > 0 else "down")
            rows.append({"variant": variant, "metric": metric, "previous": a, "latest": b, "delta": delta,
                         "relative": rel, "status": status})
    return rows


def render_report(runs_root: str | os.PathLike, run_id: str, failures: Sequence[Mapping[str, str]] = ()) -> ReportResult:
    """Write report.md and the figures of run `run_id`; return what they show (for artifacts)."""
    info = load_run(runs_root, run_id)
    run_dir = Path(info.run_dir)
    man = info.manifest
    df = load_metrics(run_dir, run_id)
    rotations = load_rotations(run_dir)
    nights = night_order(df)
    latest = nights[-1] if nights else None
    previous = nights[-2] if len(nights) > 1 else None
    result = ReportResult(report_path=str(run_dir / REPORT_NAME), run_id=run_id, latest_night=latest,
                          previous_night=previous, n_rows=int(len(df)))
    md = [f"# QA report — run `{run_id}`", ""]
    models = read_models(run_dir)
    origin, note = provenance_rows(man, models)
    # Short values: Prefect's UI keeps a table inside its column, so a long one scrolls or spills.
    md += [md_table(["field", "value"], [
        ["created", man.get("created_at")], ["project commit", short_revision(man.get("git_commit"))],
        ["dataset snapshot", f"`{short_revision(info.snapshot_digest)}` ({man.get('n_blurbs')} blurbs, "
                             f"{man.get('n_prompt_files')} prompt files)"],
        *origin,
        ["latest night", latest or "—"], ["previous night", previous or "—"],
        ["nights in ledger", len(nights)], ["ledger rows (latest per night)", len(df)],
    ]), ""]
    if note:
        md += [note, ""]
    if models:
        md += [f"## Checkpoints (QA night {models.get('night')})", "",
               md_table(["model", "revision", "checkpoint"], checkpoint_rows(models)), ""]
    if failures:
        md += ["## Failed variants (latest QA run)", "",
               "These variants have no rows for this QA run; the other variants' rows are kept.", ""]
        md += [f"- **{f.get('variant')}**: {str(f.get('error', '')).splitlines()[0][:400] if f.get('error') else ''}"
               for f in failures]
        md.append("")
    figures_dir = run_dir / "figures"
    figures_dir.mkdir(exist_ok=True)
    if latest is None:
        md += ["## Summary", "", "No QA metrics are recorded for this run yet: run "
               "`tourguide qa --config <eval config>` (see deployments/eval_template.json).", ""]
    else:
        nd = df[df.night == latest]
        stale = sorted(set(nd.snapshot_digest) - {info.snapshot_digest})
        if stale:
            md += [f"> Warning: some rows were measured on another dataset snapshot ({', '.join(s[:12] for s in stale)})."]
        now = summary_values(nd)
        variants = [v for v in variant_order(nd) if v in now]
        metrics = [m for m in SUMMARY_METRICS if any(m in now[v] for v in variants)]
        result.summary = [{"variant": v, **{m: now[v].get(m) for m in metrics}} for v in variants]
        md += [f"## Summary — night {latest}", "",
               "Means over the frozen snapshot's tokens: KL(teacher ‖ variant) and surprisal in nats/token; "
               "per-layer metrics averaged over layers (tables below).", ""]
        md += [md_table(["variant"] + [SUMMARY_LABELS.get(m, m) for m in metrics],
                        [[v] + [now[v].get(m) for m in metrics] for v in variants]), ""]
        md += ["## What changed since the previous night", ""]
        if previous is None:
            md += [f"No previous night in this run's ledger (first night: {latest}).", ""]
        else:
            before = summary_values(df[df.night == previous])
            result.changes = compare_nights(now, before)
            md += [f"Night {previous} → {latest}.", ""]
            md += [md_table(["variant", "metric", previous, latest, "Δ (relative)", "status"],
                            [[c["variant"], c["metric"], c["previous"], c["latest"], change_cell(c), c["status"]]
                             for c in result.changes]), ""]
        md += ["## Per-layer metrics", ""]
        for metric in LAYER_METRICS:
            table = per_layer_values(nd, metric)
            if not table:
                continue
            cols = [v for v in variants if any(v in vals for vals in table.values())]
            result.per_layer[metric] = [{"layer": la, **{v: vals.get(v) for v in cols}} for la, vals in table.items()]
            md += [f"### {metric}", ""]
            for part in chunks(cols, MAX_VARIANT_COLUMNS):  # narrow tables: the UI's markdown view does not scroll
                md += [md_table(["layer"] + part, [[la] + [vals.get(v) for v in part] for la, vals in table.items()]), ""]
    if not rotations.empty:
        md += ["## Rotations (latest rotate run in the rotations ledger)", "",
               md_table(["layer", "kind", "tokens", "cosine before", "cosine after (per layer)", "cosine after (global)"],
                        [[r.layer, r.kind, r.n_tokens, r.cosine_before, r.cosine_after, r.cosine_global]
                         for r in rotations.itertuples()]), ""]
    md += ["## Figures", ""]
    tf = trend_frame(runs_root, run_id, info.snapshot_digest)
    if not tf.empty:
        result.figures["trends"] = plot_trends(tf, figures_dir / FIGURES["trends"])
    if latest is not None or not rotations.empty:
        qa_cos = per_layer_values(df[df.night == latest], "hidden_state_cosine") if latest is not None else {}
        if qa_cos or not rotations.empty:
            result.figures["cosine"] = plot_cosines(qa_cos, rotations, figures_dir / FIGURES["cosine"])
    if latest is not None:
        nd = df[df.night == latest]
        rms, ratio = per_layer_values(nd, "residual_rms"), per_layer_values(nd, "residual_rms_ratio")
        if rms or ratio:
            result.figures["rms"] = plot_rms(rms, ratio, figures_dir / FIGURES["rms"])
    titles = {"trends": "Metric trends across nights", "cosine": "Per-layer cosine before/after rotation",
              "rms": "Residual RMS per layer"}
    if result.figures:
        for kind, p in result.figures.items():
            md += [f"### {titles[kind]}", "", f"![{titles[kind]}](figures/{Path(p).name})", ""]
    else:
        md += ["No figures yet (no metrics or rotations recorded).", ""]
    write_text_atomic(result.report_path, "\n".join(md).rstrip() + "\n")
    return result


_FIGURE_LINK = re.compile(r"!\[([^\]]*)\]\((figures/[A-Za-z0-9_.-]+\.png)\)")


def embed_figures(markdown: str, run_dir: str | os.PathLike) -> str:
    """report.md with each figure link replaced by the PNG itself as a data URI: Prefect's UI
    cannot reach the run folder, and both of its UIs (/ and /v2) render `data:image/png` images.
    A figure file that is gone keeps its link."""
    def embed(m: re.Match[str]) -> str:
        try:
            data = (Path(run_dir) / m.group(2)).read_bytes()
        except OSError:
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"

    return _FIGURE_LINK.sub(embed, markdown)
