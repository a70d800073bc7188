"""The report as users see it in Prefect's UI: a real server with its UI, the real report flow
over a wide QA history, headless Chromium (tests/e2e/ui_check.py; the same check runs by hand:
`python tests/e2e/ui_check.py --out DIR`). Skips, saying why, without node, chromium or
playwright-core."""

from __future__ import annotations

import pytest

from tests.e2e.ui_check import missing, run_check


@pytest.mark.slow
def test_report_renders_in_both_prefect_uis(tmp_path):
    why = missing()
    if why:
        pytest.skip(f"UI check not run: {why}")
    code, out = run_check(tmp_path / "ui")
    pages = {p["name"]: p for p in out["results"]["pages"]}
    assert code == 0, {n: p["problems"] for n, p in pages.items()}
    for name in ("v1-report", "v2-report"):
        imgs = pages[name]["imgs"]
        assert len(imgs) == 3 and all(i["complete"] and i["naturalWidth"] > 300 for i in imgs), imgs
        assert not any(i["overflows"] for i in imgs) and not any(t["overflows"] for t in pages[name]["tables"])
        assert all(t["cols"] <= 7 for t in pages[name]["tables"])
    # the negative controls were flagged: the check can fail
    assert any("did not load" in p for p in pages["v1-control"]["problems"])
    assert any("table reaches" in p for p in pages["v2-control"]["problems"])
    # names and keys as the UI shows them
    run_id = out["fixture"]["run_id"]
    assert out["fixture"]["flow_run_name"] == f"report-{run_id}"
    assert set(out["fixture"]["artifacts"]) == {f"qa-{k}-{run_id}" for k in (
        "report", "summary", "changes", "layers-hidden-state-cosine", "layers-residual-rms", "layers-residual-rms-ratio")}
