"""The report's seaborn figures (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib.qa.metric_names import SUMMARY_METRICS, layer_sort_key
from lib.store.atomic import write_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _save(fig: Any, path: Path) -> str:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return str(path)


def panel_width(n_layers: int) -> float:
    """Inches: room for the layer labels, capped so a deep model's figure still reads when the UI
    scales it down to its column."""
    return min(11.0, max(6.0, 0.35 * n_layers + 3))


def short_layer(layer: str) -> str:
    """'model.layers.3' → 'L3' for axis labels; other hook points unchanged."""
    m = re.match(r"^(?:.*\.)?layers\.(\d+)$", layer)
    return f"L{m.group(1)}" if m else layer


def plot_trends(tf, path: Path) -> str:
    plt, sns = _pyplot()
    metrics = [m for m in SUMMARY_METRICS if m in set(tf.metric)]
    hue_order = list(tf.variant.drop_duplicates())
    grid = sns.relplot(data=tf, x="point", y="value", hue="variant", hue_order=hue_order, col="metric",
                       col_order=metrics, kind="line",
                       marker="o", col_wrap=min(2, len(metrics)), height=2.8, aspect=1.4,
                       facet_kws={"sharey": False, "sharex": True})
    for ax in grid.axes.flat:
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_xlabel("night")
    grid.set_titles("{col_name}")
    grid.figure.suptitle("QA metrics across nights", y=1.02)
    out = _save(grid.figure, path)
    plt.close(grid.figure)
    return out


def plot_cosines(qa: Mapping[str, Mapping[str, float]], rotations, path: Path) -> str:
    import pandas as pd

    plt, sns = _pyplot()
    rows = [{"layer": layer, "series": f"QA {variant}", "cosine": v} for layer, vals in qa.items() for variant, v in vals.items()]
    if not rotations.empty:
        for r in rotations.itertuples():
            for col, label in (("cosine_before", "rotate: before rotation"), ("cosine_after", "rotate: per-layer rotation"),
                               ("cosine_global", "rotate: global rotation")):
                val = getattr(r, col)
                if val is not None and not (isinstance(val, float) and math.isnan(val)):
                    rows.append({"layer": str(r.layer), "series": label, "cosine": float(val)})
    df = pd.DataFrame(rows)
    layers = sorted(df.layer.unique(), key=layer_sort_key)
    df["layer"] = pd.Categorical(df.layer.map(short_layer), categories=[short_layer(x) for x in layers], ordered=True)
    fig, ax = plt.subplots(figsize=(panel_width(len(layers)), 4))
    dashes = {s: (2, 2) if s.startswith("rotate: before") else "" for s in df.series.unique()}
    series = list(dict.fromkeys(r["series"] for r in rows))
    sns.lineplot(data=df.sort_values("layer"), x="layer", y="cosine", hue="series", style="series", dashes=dashes,
                 hue_order=series, style_order=series, markers=True, ax=ax)
    ax.set_title("Per-layer cosine to the teacher, before / after rotation")
    ax.set_ylabel("mean token cosine")
    ax.set_xlabel("decoder block output (residual)")
    ax.legend(fontsize=8, loc="best")
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_rms(rms: Mapping[str, Mapping[str, float]], ratio: Mapping[str, Mapping[str, float]], path: Path) -> str:
    import pandas as pd

    plt, sns = _pyplot()
    layers = sorted(set(rms) | set(ratio), key=layer_sort_key)
    a = pd.DataFrame([{"layer": la, "variant": v, "value": x} for la, vals in rms.items() for v, x in vals.items()])
    b = pd.DataFrame([{"layer": la, "variant": v, "value": x} for la, vals in ratio.items() for v, x in vals.items()])
    panels = [(a, "residual RMS"), (b, "RMS ratio to the teacher")]
    panels = [(d, t) for d, t in panels if not d.empty]
    # Panels stacked, not side by side: the report is read in a narrow column (Prefect's UI).
    fig, axes = plt.subplots(len(panels), 1, figsize=(panel_width(len(layers)), 3.6 * len(panels)), squeeze=False)
    for ax, (d, title) in zip(axes[:, 0], panels, strict=True):
        d = d.copy()
        d["layer"] = pd.Categorical(d.layer.map(short_layer), categories=[short_layer(x) for x in layers], ordered=True)
        sns.lineplot(data=d.sort_values("layer"), x="layer", y="value", hue="variant", marker="o", ax=ax)
        ax.set_title(title)
        ax.set_ylabel(title)
        ax.set_xlabel("decoder block output (residual)")
    if len(panels) == 2:
        axes[1][0].axhline(1.0, color="grey", lw=0.8, ls="--")
        axes[0][0].set_xlabel("")  # the lower panel's label serves both
    fig.suptitle("Residual RMS per layer")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
