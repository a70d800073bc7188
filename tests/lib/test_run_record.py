"""One run id, one pipeline config (lib.pipeline.run_record): the first run records it, the same
config continues, a different one is refused listing what changed; result-neutral fields may differ."""

from __future__ import annotations

import json

import pytest

from lib.core.errors import BadInputError
from lib.pipeline.config import PipelineConfig, default_run_id
from lib.pipeline.run_record import RECORD_NAME, RESULT_NEUTRAL, claim_run, config_differences


@pytest.fixture
def models(tmp_path):
    """Two stand-in model folders: resolving a local model reads only config.json (and hashes the files)."""
    out = []
    for name in ("teacher", "student"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "qwen3"}')
        out.append(d)
    return out


def cfg(models, tmp_path, **kw) -> PipelineConfig:
    return PipelineConfig(teacher=str(models[0]), student=str(models[1]), runs_root=str(tmp_path / "runs"),
                          run_id="r", device="cpu", **kw)


def test_same_config_continues_and_a_different_one_is_refused(models, tmp_path):
    first = claim_run(cfg(models, tmp_path, limit=8))
    assert first["created"] and json.loads((tmp_path / "runs" / "r" / RECORD_NAME).read_text())["config"]["limit"] == 8
    assert not claim_run(cfg(models, tmp_path, limit=8))["created"]
    # where things run and how work is split change no result
    claim_run(cfg(models, tmp_path, limit=8, batch_size=2, hf_home=str(tmp_path)))
    # the permutations compare as solved: none are with pca_dim
    with pytest.raises(BadInputError, match=r"different config .*\n  limit: 8 → 9\n  pca_dim: \(unset\) → 4\n"
                                            r"  solve_permutations: true → false\nFix: pick"):
        claim_run(cfg(models, tmp_path, limit=9, pca_dim=4))
    # a checkpoint rewritten in place is another experiment
    (models[1] / "model.safetensors").write_bytes(b"new weights")
    with pytest.raises(BadInputError, match=r"student_revision: \"sha256:[0-9a-f]+\" → \"sha256:[0-9a-f]+\""):
        claim_run(cfg(models, tmp_path, limit=8))


def test_fields_added_after_a_record_compare_as_their_default():
    assert config_differences({"limit": 8}, {"limit": 8, "compute_dtype": None, "exclude_position0": False}) == []
    assert config_differences({"limit": 8}, {"limit": 8, "exclude_position0": True}) == \
        ["exclude_position0: false → true"]
    assert {"use_deployments", "batch_size", "run_id"} <= RESULT_NEUTRAL and "limit" not in RESULT_NEUTRAL


def test_a_broken_record_is_refused_not_overwritten(models, tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / RECORD_NAME).write_text("{not json")
    with pytest.raises(BadInputError, match=r"pipeline.json: not valid JSON"):
        claim_run(cfg(models, tmp_path))
    assert (run / RECORD_NAME).read_text() == "{not json"


def test_default_run_id_names_the_pair():
    assert default_run_id("Qwen/Qwen3-0.6B", "./out/my student/") == "my-student-to-Qwen3-0.6B"
    PipelineConfig(teacher="t", student="s", run_id=default_run_id("Qwen/Qwen3-0.6B", "/x/@@"))  # always valid
