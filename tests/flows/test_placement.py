"""use_deployments "auto" (flows/placement.py): off for a run in this process, on for a run a
worker started from a deployment (the real-server case is tests/e2e/test_server.py)."""

from __future__ import annotations

import pytest
from prefect import flow

from flows.placement import deployments_wanted
from lib.core.errors import TourGuideError
from lib.pipeline.config import PipelineConfig


def test_auto_is_off_in_process_and_explicit_values_win(prefect_harness):
    @flow
    def probe(value) -> bool:
        return deployments_wanted(value)

    assert probe("auto") is False and probe(None) is False
    assert probe(True) is True and probe(False) is False
    assert deployments_wanted(True) is True  # outside any run too
    with pytest.raises(TourGuideError, match="true, false or"):
        deployments_wanted("yes")


def test_auto_is_on_inside_a_deployment_run(monkeypatch):
    # Prefect's own mock of runtime values (what a worker-started run reads from its context)
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "3b5f0c9e-0000-0000-0000-000000000000")
    assert deployments_wanted("auto") is True and deployments_wanted(False) is False


def test_pipeline_config_defaults_to_auto():
    cfg = PipelineConfig(teacher="t", student="s")
    assert cfg.use_deployments == "auto"
    assert PipelineConfig.parse({"teacher": "t", "student": "s", "use_deployments": True}).use_deployments is True
    with pytest.raises(Exception, match="use_deployments"):
        PipelineConfig.parse({"teacher": "t", "student": "s", "use_deployments": "sometimes"})
