"""The offline demo end to end on tiny settings: planted transforms recovered, gate passes,
ledgers and report exist and agree; a second run reuses the fold and the QA metrics."""

from __future__ import annotations

import pytest

from flows.demo import demo_flow
from lib.store.ledgers import read_ledger

TINY = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256,
            vocab_size=512, steps=25, batch_size=8, max_length=48)


@pytest.mark.slow
def test_demo_recovers_planted_transforms(prefect_harness, tmp_path):
    kw = dict(run_id="tiny", runs_root=str(tmp_path / "runs"), noise=0.01, seed=3, limit=24, max_length=32,
              batch_size=24, recipe=TINY)
    s = demo_flow(**kw)
    rec = s["recovery"]
    assert rec["head_accuracy"] == 1.0 and rec["neuron_accuracy"] == 1.0, rec
    assert rec["rotation_rel_fro_err"] < 0.1, rec
    for layer in s["rotate"]["layers"]:
        assert layer["cosine_after"] >= 0.99 and layer["cosine_global"] >= 0.99, layer
        assert layer["cosine_before"] < 0.5, "negative control: the planted rotation must scramble the basis"
    gate = s["gate"]
    assert gate["status"] == "passed" and gate["mean_kl"] < 1e-9 and gate["top1_agreement"] == 1.0

    run_dir = tmp_path / "runs" / "tiny"
    metrics = read_ledger(run_dir / "ledgers" / "metrics", "metrics")
    night = s["qa"]["night"]
    tonight = metrics[(metrics.night == night) & metrics["sample"].isna()]
    kl = tonight[(tonight.metric == "logit_kl")].set_index("variant")["value"]
    assert set(kl.index) >= {"student-baseline", "student-rotated", "student-folded"}
    cos = tonight[tonight.metric == "hidden_state_cosine"].groupby("variant")["value"].mean()
    assert cos["student-folded"] > 0.99 and cos["student-rotated"] > 0.99 and cos["student-baseline"] < 0.5
    report = (run_dir / "report.md").read_text()
    assert f"{kl['student-folded']:.6g}" in report, "report disagrees with the metrics ledger"
    assert s["report"] and (run_dir / "figures" / "metric_trends.png").stat().st_size > 1000
    rotations = read_ledger(run_dir / "ledgers" / "rotations", "rotations")
    assert len(rotations) == len(s["rotate"]["layers"])

    # Second identical run: the fold is reused (same spec, files, source) and the QA metrics of
    # this night come from the cache: no new metric rows.
    n_rows = len(metrics)
    again = demo_flow(**kw)
    assert again["gate"]["status"] == "passed"
    assert len(read_ledger(run_dir / "ledgers" / "metrics", "metrics")) == n_rows
    assert again["recovery"] == rec
