"""The nightly QA flow end to end on tiny models under the Prefect test harness.

Variants of a tiny Llama teacher: the same function in a rotated residual basis (built here by
hand: gains folded, x ↦ xQ), compared without and with its rotation, and a variant whose rotation
file has the wrong width (it must fail alone). Oracles: HF forward passes for surprisal, the
parquet ledger for the report, PIL for the PNGs, the Prefect client for the artifacts.

Run: `.venv/bin/python -m pytest tests/flows/test_qa_flow.py -q`
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import save_file

from flows.qa import qa_flow
from flows.scaffold import scaffold_flow
from tasks.report import artifact_key
from tests.lib.test_report import check_png, md_section, md_table

TEXTS = ["Bondi Beach curves for a kilometre of pale sand.", "The Louvre's glass pyramid glows at dusk.",
         "悉尼歌剧院的白色风帆倒映在港湾里。"]


def rotate_model(src: Path, out: Path, q: torch.Tensor) -> Path:
    """The same function in the residual basis x ↦ x Q (float64 maths, saved float32): fold each
    norm gain into the linears that read it, then readers W ← W Q, writers W ← Qᵀ W, E ← E Q."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64)
    m = model.model
    with torch.no_grad():
        def read(lin, gain):
            lin.weight.copy_(lin.weight * gain[None, :] @ q)

        for layer in m.layers:
            g1, g2 = layer.input_layernorm.weight.clone(), layer.post_attention_layernorm.weight.clone()
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                read(lin, g1)
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                read(lin, g2)
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            layer.self_attn.o_proj.weight.copy_(q.T @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(q.T @ layer.mlp.down_proj.weight)
        m.embed_tokens.weight.copy_(m.embed_tokens.weight @ q)
        read(model.lm_head, m.norm.weight.clone())
        m.norm.weight.fill_(1.0)
    model.to(torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def hf_surprisal(model_dir: Path, texts: list[str]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.inference_mode():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            nll -= float(lp[:-1].gather(1, ids[0, 1:, None]).sum())
            n += ids.shape[1] - 1
    return nll / n


@pytest.mark.slow
def test_nightly_qa_flow_two_variants_report_and_artifacts(prefect_harness, make_tiny, tmp_path):
    teacher = make_tiny("llama")
    q = torch.linalg.qr(torch.randn(128, 128, generator=torch.Generator().manual_seed(7), dtype=torch.float64))[0]
    rotated = rotate_model(teacher, tmp_path / "rotated", q)
    save_file({"rotation": q.T.numpy().copy()}, str(tmp_path / "q.safetensors"))  # maps x Q back onto x
    save_file({"rotation": np.eye(64)}, str(tmp_path / "wrong.safetensors"))

    samples, prompts = tmp_path / "samples", tmp_path / "prompts"
    samples.mkdir()
    prompts.mkdir()
    (samples / "stops.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    (prompts / "system.md").write_text("You are a tour guide.\n")
    runs = tmp_path / "runs"
    scaffold = dict(run_id="nightly", runs_root=str(runs), samples_dir=str(samples), prompts_dir=str(prompts))
    assert scaffold_flow(**scaffold)["created"] and not scaffold_flow(**scaffold)["created"]
    config = {
        "run_id": "nightly", "runs_root": str(runs), "teacher": {"path": str(teacher)},
        "variants": [
            {"name": "rotated-raw", "path": str(rotated)},
            {"name": "broken", "path": str(rotated), "transports": [{"kind": "rotation", "path": str(tmp_path / "wrong.safetensors")}]},
            {"name": "rotated-aligned", "path": str(rotated),
             "transports": [{"kind": "rotation", "path": str(tmp_path / "q.safetensors")}]},
        ],
        "device": "cpu", "batch_size": 2,
    }
    (tmp_path / "eval.json").write_text(json.dumps(config))

    state = qa_flow(config=str(tmp_path / "eval.json"), night="n1", return_state=True)
    assert state.is_failed(), "a failing variant must fail the night (after the others are recorded)"
    assert "broken" in str(state.message) or "broken" in repr(state)

    # the ledger: rows of the teacher and both good variants; none of the broken one
    df = pq.read_table(runs / "nightly" / "ledgers" / "metrics").to_pandas()
    assert set(df.variant) == {"teacher", "rotated-raw", "rotated-aligned"}
    assert (df.night == "n1").all() and (df.snapshot_digest == json.loads(
        (runs / "nightly" / "manifest.json").read_text())["snapshot_digest"]).all()
    whole = df[df["sample"].isna()]

    def val(variant, metric, layer=None):
        sel = whole[(whole.variant == variant) & (whole.metric == metric)]
        sel = sel[sel.layer.isna()] if layer is None else sel[sel.layer == layer]
        assert len(sel) == 1, (variant, metric, layer)
        return float(sel.value.iloc[0])

    layers = ["model.layers.0", "model.layers.1"]
    for layer in layers:
        assert abs(val("rotated-raw", "hidden_state_cosine", layer)) < 0.3  # raw coordinates of a rotated model
        assert val("rotated-aligned", "hidden_state_cosine", layer) == pytest.approx(1.0, abs=1e-5)
        assert val("rotated-aligned", "residual_rms_ratio", layer) == pytest.approx(1.0, abs=1e-5)
    # the rotated copy is the same function: KL 0 and the teacher's surprisal, to fp32 tolerance
    assert 0 <= val("rotated-aligned", "logit_kl") < 1e-9
    oracle = hf_surprisal(teacher, TEXTS)
    assert val("teacher", "surprisal") == pytest.approx(oracle, rel=1e-6)
    assert val("rotated-aligned", "surprisal") == pytest.approx(oracle, rel=1e-5)
    assert val("teacher", "perplexity") == pytest.approx(np.exp(oracle), rel=1e-6)
    per_sample = df[(df.variant == "rotated-raw") & (df.metric == "logit_kl") & df["sample"].notna()]
    assert sorted(per_sample["sample"]) == ["stops.txt:1", "stops.txt:2", "stops.txt:3"]

    # the report: numbers match the ledger; failures listed; figures are real PNGs
    run = runs / "nightly"
    md = (run / "report.md").read_text()
    summary = {r[0]: r[1:] for r in md_table(md_section(md, "## Summary — night n1"))}
    header = [c.strip() for c in md_section(md, "## Summary").splitlines()[4].strip("|").split("|")][1:]
    assert set(summary) == {"teacher", "rotated-raw", "rotated-aligned"}
    for variant, cells in summary.items():
        for col, cell in zip(header, cells, strict=True):
            metric = col.split(" ")[0]
            sel = whole[(whole.variant == variant) & (whole.metric == metric)]
            if sel.empty:
                assert cell == "—"
            else:
                assert float(cell) == pytest.approx(sel.value.mean(), rel=1e-5, abs=1e-12), (variant, metric)
    assert "**broken**" in md and "expects residual width 64" in md
    for name in ("metric_trends.png", "cosine_per_layer.png", "residual_rms.png"):
        check_png(str(run / "figures" / name))

    # variants of one checkpoint share one capture, under activations/qa/ (never the pipeline's folders)
    assert sorted(x.name for x in (run / "activations" / "qa").iterdir()) == ["rotated-raw", "teacher"]

    # the next night, without the broken variant: captures come from the cache, the flow completes
    # and the report compares the two nights
    config["variants"] = [v for v in config["variants"] if v["name"] != "broken"]
    (tmp_path / "eval.json").write_text(json.dumps(config))
    shards = {p: p.stat().st_mtime_ns for p in (run / "activations" / "qa").rglob("sample_*.safetensors")}
    out = qa_flow(config=str(tmp_path / "eval.json"), night="n2")
    assert len(shards) == 6 and {p: p.stat().st_mtime_ns for p in shards} == shards, "night 2 recaptured"
    assert out["failures"] == [] and [r["variant"] for r in out["results"]] == ["teacher", "rotated-raw", "rotated-aligned"]
    assert out["report"]["previous_night"] == "n1" and out["report"]["latest_night"] == "n2"
    changes = {(c["variant"], c["metric"]): c for c in out["report"]["changes"]}
    assert changes[("rotated-aligned", "logit_kl")]["status"] == "unchanged"  # same checkpoints, same numbers
    md = (run / "report.md").read_text()
    assert "Night n1 → n2." in md and "**broken**" not in md

    # the artifacts, read back through the Prefect API
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
            artifact_key("qa-report", "nightly"), artifact_key("qa-summary", "nightly")])))
    reports = [a for a in arts if a.key == artifact_key("qa-report", "nightly")]
    assert {a.type for a in reports} == {"markdown"} and len(reports) == 2  # one version per night
    assert any("## Summary — night n1" in a.data and "**broken**" in a.data for a in reports)
    assert any("## Summary — night n2" in a.data for a in reports)
    tables = [a for a in arts if a.key == artifact_key("qa-summary", "nightly")]
    assert tables and all(a.type == "table" and "rotated-aligned" in str(a.data) for a in tables)
