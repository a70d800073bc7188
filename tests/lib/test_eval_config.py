"""Eval config: JSON and TOML give equal frozen objects; every bad config names its key path.

Run: `.venv/bin/python -m pytest tests/lib/test_eval_config.py -q`
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from lib.core.errors import BadInputError
from lib.qa.eval_config import EvalConfig, TransportConfig, load_eval_config
from lib.qa.metric_names import METRICS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def paths(tmp_path):
    for name in ("teacher", "student", "folded"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "q.safetensors").write_bytes(b"x")
    return tmp_path


def base(p: Path) -> dict:
    return {
        "run_id": "nightly", "runs_root": str(p / "runs"),
        "teacher": {"path": str(p / "teacher")},
        "variants": [
            {"name": "student-baseline", "path": str(p / "student")},
            {"name": "student-rotated", "path": str(p / "student"), "revision": "abc",
             "transports": [{"kind": "rotation", "path": str(p / "q.safetensors")}]},
            {"name": "student-folded", "path": str(p / "folded"), "transports": []},
        ],
        "metrics": ["logit_kl", "surprisal"], "dtype": "bfloat16", "compute_dtype": "float32", "device": "cpu",
        "max_length": 64, "batch_size": 4, "layers": ["model.layers.0", "model.layers.1"], "limit": 10,
    }


TOML = """
run_id = "nightly"
runs_root = "{p}/runs"
metrics = ["logit_kl", "surprisal"]
dtype = "bfloat16"
compute_dtype = "float32"
device = "cpu"
max_length = 64
batch_size = 4
layers = ["model.layers.0", "model.layers.1"]
limit = 10

[teacher]
path = "{p}/teacher"

[[variants]]
name = "student-baseline"
path = "{p}/student"

[[variants]]
name = "student-rotated"
path = "{p}/student"
revision = "abc"
[[variants.transports]]
kind = "rotation"
path = "{p}/q.safetensors"

[[variants]]
name = "student-folded"
path = "{p}/folded"
transports = []
"""


def test_json_and_toml_give_equal_frozen_objects(paths):
    (paths / "c.json").write_text(json.dumps(base(paths)))
    (paths / "c.toml").write_text(TOML.format(p=paths))
    a, b = load_eval_config(paths / "c.json"), load_eval_config(paths / "c.toml")
    assert isinstance(a, EvalConfig) and a == b and hash(a) == hash(b)
    assert a.variants[1].transports == (TransportConfig(kind="rotation", path=str(paths / "q.safetensors")),)
    assert a.teacher.name == "teacher" and a.teacher.revision is None and a.variants[0].transports == ()
    assert a.layers == ("model.layers.0", "model.layers.1") and a.batch_size == 4
    with pytest.raises(ValidationError, match="frozen"):
        a.run_id = "other"  # type: ignore[misc]
    assert EvalConfig.model_validate(a.model_dump(mode="json")) == a  # what the flow passes between tasks round-trips
    minimal = EvalConfig.model_validate({"run_id": "r", "teacher": {"path": "t"}, "variants": [{"name": "v", "path": "s"}]})
    assert minimal.metrics == METRICS and minimal.dtype == "float32" and minimal.layers == ()


def test_template_parses():
    cfg = load_eval_config(ROOT / "deployments" / "eval_template.json", check_paths=False)
    assert {v.name for v in cfg.variants} >= {"student-baseline", "student-rotated"}
    assert set(cfg.metrics) == set(METRICS)
    assert any(t.kind == "rotation" for v in cfg.variants for t in v.transports)


def _mutate(d: dict, path: list, value) -> dict:
    d = json.loads(json.dumps(d))
    node = d
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


@pytest.mark.parametrize("path, value, needle", [
    (["colour"], "red", r"colour: unknown key"),
    (["variants", 1, "pathh"], "x", r"variants\[1\]\.pathh: unknown key"),
    (["variants", 1, "transports", 0, "kindd"], "x", r"variants\[1\]\.transports\[0\]\.kindd: unknown key"),
    (["variants", 0, "path"], KeyError, r"variants\[0\]\.path: required key is missing"),
    (["teacher"], KeyError, r"teacher: required key is missing"),
    (["batch_size"], "eight", r"batch_size: must be an integer, got 'eight'"),
    (["batch_size"], True, r"batch_size: must be an integer, got True"),
    (["batch_size"], 8.0, r"batch_size: must be an integer"),
    (["layers", 0], 3, r"layers\[0\]: must be a string"),
    (["teacher"], "t", r"teacher: must be a table/object"),
    (["batch_size"], 0, r"batch_size: must be >= 1"),
    (["max_length"], None, None),  # null is allowed where the field is optional
    (["metrics", 1], "bleu", r"metrics\[1\]: unknown metric 'bleu'"),
    (["variants", 1, "transports", 0, "kind"], "affine", r"variants\[1\]\.transports\[0\]\.kind: 'affine'"),
    (["variants", 2, "name"], "student-baseline", r"variants\[2\]\.name: name 'student-baseline' is used twice"),
    (["variants", 0, "name"], "bad/name", r"variants\[0\]\.name: 'bad/name'"),
    (["variants"], [], r"variants: list at least one"),
    (["variants"], {"name": "x"}, r"variants: must be a list"),
    (["dtype"], "float8", r"dtype: 'float8' is not one of"),
    (["layers"], ["model.layers.0.mlp.down_proj:input"], None),  # fine: the base metrics need no residual

    (["run_id"], "../escape", r"run_id '\.\./escape'"),
    (["variants", 2, "path"], "{p}/nowhere/model", r"variants\[2\]\.path: model folder .*nowhere/model not found"),
    (["teacher", "path"], "{p}/student/config.json", r"teacher\.path: model folder"),
    (["variants", 1, "transports", 0, "path"], "{p}/missing.safetensors",
     r"variants\[1\]\.transports\[0\]\.path: rotation file .*missing.safetensors not found"),
])
def test_bad_configs_name_the_key(paths, path, value, needle):
    if isinstance(value, str):
        value = value.format(p=paths)
    data = _mutate(base(paths), path, value)
    (paths / "bad.json").write_text(json.dumps(data))
    if needle is None:
        assert load_eval_config(paths / "bad.json") == EvalConfig.parse(data)
        return
    with pytest.raises(BadInputError, match=needle) as err:
        load_eval_config(paths / "bad.json")
    assert str(paths / "bad.json") in str(err.value)  # every message names the file


def test_toml_errors_name_the_same_key_path(paths):
    (paths / "c.toml").write_text(TOML.format(p=paths).replace('kind = "rotation"', 'kind = "rotation"\nweight = 2'))
    with pytest.raises(BadInputError, match=r"c\.toml: variants\[1\]\.transports\[0\]\.weight: unknown key"):
        load_eval_config(paths / "c.toml")


def test_unreadable_files(paths):
    (paths / "c.json").write_text('{"run_id": "x",\n "teacher": }')
    with pytest.raises(BadInputError, match=r"c\.json:2:\d+: not valid JSON"):
        load_eval_config(paths / "c.json")
    (paths / "c.toml").write_text("run_id = \n")
    with pytest.raises(BadInputError, match=r"c\.toml: not valid TOML"):
        load_eval_config(paths / "c.toml")
    (paths / "c.yaml").write_text("run_id: x")
    with pytest.raises(BadInputError, match="use .json or .toml"):
        load_eval_config(paths / "c.yaml")
    with pytest.raises(BadInputError, match="file not found"):
        load_eval_config(paths / "absent.json")
    (paths / "list.json").write_text("[]")
    with pytest.raises(BadInputError, match="top level: must be a table/object"):
        load_eval_config(paths / "list.json")


def test_residual_metrics_need_a_residual_layer(paths):
    data = {**base(paths), "layers": ["model.layers.0.mlp.down_proj:input"], "metrics": ["residual_rms"]}
    with pytest.raises(BadInputError, match=r"layers: none of .* is a decoder block output"):
        EvalConfig.parse(data, "cfg")
    assert EvalConfig.parse({**data, "layers": ["model.layers.0.mlp.down_proj:input", "model.layers.1"]}, "cfg")


def test_cli_qa_fails_fast_on_a_bad_config(paths, capsys):
    from flows.cli import main

    (paths / "bad.json").write_text(json.dumps(_mutate(base(paths), ["variants", 1, "pathh"], "x")))
    with pytest.raises(SystemExit) as code:
        main(["qa", "--config", str(paths / "bad.json")])
    assert code.value.code == 2 and "variants[1].pathh: unknown key" in capsys.readouterr().err
    (paths / "good.json").write_text(json.dumps(base(paths)))
    with pytest.raises(SystemExit) as code:
        main(["qa", "--config", str(paths / "good.json")])
    err = capsys.readouterr().err
    assert code.value.code == 2 and "never scaffolded" in err and "tourguide scaffold --run-id nightly" in err
    assert not (paths / "runs").exists(), "a refused QA wrote something"
