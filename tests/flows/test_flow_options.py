"""Flow parameters typed as options models (pipeline config, demo recipe): a typo fails the flow
with a BadInputError naming the key before any step runs (Prefect's own check would raise a
ParameterTypeError; the demo recipe used to raise a bare TypeError). The fold and rotate flows'
options are tested in test_fold_flow.py / test_rotate_flow.py."""

from __future__ import annotations

import pytest

from lib.core.errors import BadInputError


@pytest.mark.parametrize("config, needle", [
    ({"teacher": "t", "student": "s", "teacherr": "x"}, r"pipeline_flow config: teacherr: unknown key \(did you mean"),
    ({"teacher": "t", "student": "s", "metrics": ["bleu"]}, r"pipeline_flow config: metrics\[0\]: unknown metric 'bleu'"),
    ({"student": "s"}, r"pipeline_flow config: teacher: required key is missing"),
])
def test_pipeline_flow_refuses_a_bad_config(prefect_harness, tmp_path, config, needle):
    from flows.pipeline import pipeline_flow

    with pytest.raises(BadInputError, match=needle):
        pipeline_flow(config={**config, "runs_root": str(tmp_path / "runs")})
    assert not (tmp_path / "runs").exists()
    schema = pipeline_flow.parameters.model_dump()
    assert schema["definitions"]["PipelineConfig"]["additionalProperties"] is False


def test_demo_flow_refuses_a_bad_recipe(prefect_harness, tmp_path):
    from flows.demo import demo_flow

    with pytest.raises(BadInputError, match=r"demo_flow recipe: step: unknown key \(did you mean 'steps'\?\)"):
        demo_flow(run_id="x", runs_root=str(tmp_path / "runs"), recipe={"step": 3})
    assert not (tmp_path / "runs").exists()
