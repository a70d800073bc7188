"""Typed options (lib/core/options.py): every options/config object refuses unknown keys and wrong
types with a BadInputError quoting the key path, round-trips through `model_dump(mode="json")`,
and documents every field (Prefect renders these models as forms).

Hole 3 of issue 11: the fold, gate and transport options used to drop unknown keys silently, so
a typo in a deployment parameter changed nothing. The flow-level half is tests/flows/test_flow_options.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib.capture.spec import CaptureSpec
from lib.core.errors import BadInputError
from lib.core.options import Model, Options, Seq, read_config_file
from lib.demo.teacher import DemoRecipe
from lib.fold.gate import GateOptions
from lib.fold.options import FoldOptions
from lib.pipeline.config import PipelineConfig
from lib.qa.eval_config import EvalConfig
from lib.store.runs import ScaffoldSpec
from lib.transport.options import RotateOptions

EVAL = {"run_id": "r", "teacher": {"path": "t"}, "variants": [{"name": "v", "path": "s"}]}
PIPE = {"teacher": "t", "student": "s"}

# (class, a valid mapping, a typo'd key, the key it should have been, what the message names the object)
TYPOS = [
    (FoldOptions, {}, "overwrit", "overwrite", "fold options"),
    (GateOptions, {}, "n_text", "n_texts", "gate options"),
    (RotateOptions, {}, "pca_dims", "pca_dim", "rotate options"),
    (CaptureSpec, {"model": "m"}, "dtypes", "dtype", "capture spec"),
    (EvalConfig, EVAL, "batchsize", "batch_size", "eval config"),
    (PipelineConfig, PIPE, "solve_permutation", "solve_permutations", "pipeline config"),
    (ScaffoldSpec, {"run_id": "r"}, "prompt", "prompts", "scaffold spec"),
    (DemoRecipe, {}, "step", "steps", "demo recipe"),
]


@pytest.mark.parametrize("cls, valid, typo, meant, label", TYPOS, ids=[t[0].__name__ for t in TYPOS])
def test_unknown_keys_are_refused_naming_the_key(cls, valid, typo, meant, label):
    assert cls.model_validate(valid) == cls.parse(valid)  # the valid mapping is fine
    bad = {**valid, typo: True}
    for attempt in (lambda: cls.model_validate(bad), lambda: cls(**bad)):
        with pytest.raises(BadInputError, match=rf"^{label}: {typo}: unknown key \(did you mean '{meant}'\?\); "
                                                rf"top level accepts \[.*'{meant}'.*\]"):
            attempt()
    with pytest.raises(BadInputError, match=rf"^deployment parameter x: {typo}: unknown key"):
        cls.parse(bad, "deployment parameter x")


def test_nested_unknown_keys_name_the_whole_path():
    data = {**EVAL, "variants": [{"name": "v", "path": "s", "transports": [{"kind": "rotation", "pth": "q"}]}]}
    with pytest.raises(BadInputError, match=r"^e\.toml: variants\[0\]\.transports\[0\]\.pth: unknown key \(did you "
                                            r"mean 'path'\?\); variants\[0\]\.transports\[0\] accepts \['kind', 'path'\]"):
        EvalConfig.parse(data, "e.toml")
    # the plan tasks pass around: its nested options are checked too
    with pytest.raises(BadInputError, match=r"options\.pca_dims: unknown key"):
        from lib.transport.plan import RotationPlan

        RotationPlan.model_validate({"options": {"pca_dims": 3}})


@pytest.mark.parametrize("cls, data, needle", [
    (FoldOptions, {"overwrite": "yes"}, r"overwrite: must be a boolean \(true/false\), got 'yes'"),
    (FoldOptions, {"max_shard_bytes": "2GB"}, r"max_shard_bytes: must be an integer, got '2GB'"),
    (FoldOptions, {"max_shard_bytes": 0}, r"max_shard_bytes: must be >= 1, got 0"),
    (FoldOptions, {"dtype": "float8"}, r"dtype: 'float8' is not one of \['float32', 'float16', 'bfloat16'\]"),
    (GateOptions, {"n_texts": True}, r"n_texts: must be an integer, got True"),
    (GateOptions, {"n_texts": 0}, r"n_texts: must be >= 1, got 0"),
    (GateOptions, {"text_files": "a.txt"}, r"text_files: must be a list, got 'a.txt'"),
    (GateOptions, {"max_mean_kl": "small"}, r"max_mean_kl: must be a number, got 'small'"),
    (RotateOptions, {"pca_dim": 0}, r"pca_dim: --pca-dim must be >= 1, got 0"),
    (RotateOptions, {"pca_dim": 2.5}, r"pca_dim: must be an integer, got 2.5"),
    (RotateOptions, {"layer_weights": [["model.layers.0", -1]]}, r"--layer-weight model.layers.0=-1.0: .*>= 0"),
    (RotateOptions, {"layer_weights": [["model.layers.0"]]}, r"layer_weights\[0\]"),
    (RotateOptions, {"pool_scale": "log"}, r"pool_scale: 'log' is not one of \['raw', 'normalized'\]"),
    (CaptureSpec, {"model": "m", "batch_size": 0}, r"batch_size: --batch-size must be >= 1, got 0"),
    (CaptureSpec, {"model": "m", "backend": "tgi"}, r"backend: 'tgi' is not one of \['torch', 'vllm'\]"),
    (CaptureSpec, {"model": "m", "hook_points": ["model.layers.0", 3]}, r"hook_points\[1\]: must be a string"),
    (CaptureSpec, {}, r"model: required key is missing"),
    (PipelineConfig, {**PIPE, "metrics": ["bleu"]}, r"metrics\[0\]: unknown metric 'bleu'"),
    (PipelineConfig, {**PIPE, "metrics": []}, r"metrics: turn at least one of"),
    (PipelineConfig, {**PIPE, "dtype": "fp8"}, r"dtype: 'fp8' is not one of"),
    (PipelineConfig, {**PIPE, "run_id": "../x"}, r"run_id '\.\./x'"),
    (PipelineConfig, {**PIPE, "batch_size": 0}, r"batch_size: must be >= 1, got 0"),
    (DemoRecipe, {"lr": "fast"}, r"lr: must be a number, got 'fast'"),
])
def test_wrong_types_and_values_name_the_key(cls, data, needle):
    with pytest.raises(BadInputError, match=needle):
        cls.parse(data, "src")


@pytest.mark.parametrize("obj", [
    FoldOptions(dtype="bfloat16", overwrite=True), GateOptions(text_files=(Path("a.txt"),), max_mean_kl=1e-3),
    RotateOptions(pca_dim=4, layer_weights=(("model.layers.0", 2),), model_config="cfg.json"),
    CaptureSpec(model=Path("m"), hook_points=("model.layers.0",), vllm_options={"enforce_eager": True}),
    EvalConfig.model_validate(EVAL), PipelineConfig(**PIPE, layers=("model.layers.0",)),
    ScaffoldSpec(run_id="r", prompts=("a.md",)), DemoRecipe(steps=3),
], ids=lambda o: type(o).__name__)
def test_json_round_trip_and_frozen_values(obj):
    dumped = obj.model_dump(mode="json")
    assert json.loads(json.dumps(dumped)) == dumped  # JSON-able: what tasks and deployments pass
    assert type(obj).model_validate(dumped) == obj
    with pytest.raises(Exception, match="frozen"):
        obj.device = "x"  # type: ignore[misc]
    if not isinstance(obj, CaptureSpec):  # (vllm_options is a dict)
        assert hash(type(obj).model_validate(dumped)) == hash(obj)


def test_paths_and_lists_are_normalised():
    g = GateOptions(text_files=[Path("/x/a.txt")])
    assert g.text_files == ("/x/a.txt",) and isinstance(g.text_files, tuple)
    r = RotateOptions.model_validate({"layer_weights": [["model.layers.0", 1]], "model_config": "c"})
    assert r.layer_weights == (("model.layers.0", 1.0),) and r.config_ref == "c"
    assert r.model_dump(mode="json")["model_config"] == "c"  # written as users write it


def _options_classes() -> list[type]:
    out, todo = [], [Options]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls is not Options:
            out.append(cls)
    return out


def test_every_option_field_is_documented_for_the_ui_forms():
    classes = {c.__name__ for c in _options_classes()}
    assert {"FoldOptions", "GateOptions", "RotateOptions", "CaptureSpec", "EvalConfig", "PipelineConfig",
            "ScaffoldSpec", "DemoRecipe", "TransportConfig", "VariantConfig", "TeacherConfig"} <= classes
    bare = [f"{c.__name__}.{n}" for c in _options_classes() for n, f in c.model_fields.items() if not f.description]
    assert not bare, f"fields without a description (the Prefect UI form shows it): {bare}"
    schema = FoldOptions.model_json_schema()
    assert schema["additionalProperties"] is False and schema["properties"]["dtype"]["anyOf"][0]["enum"]


def test_every_problem_is_counted_and_unknown_keys_come_first():
    with pytest.raises(BadInputError) as err:
        EvalConfig.parse({"run_id": "r", "variantz": []}, "c.json")
    msg = str(err.value)
    assert msg.startswith("c.json: variantz: unknown key (did you mean 'variants'?)")
    assert "(and 2 more problem(s): teacher, variants)" in msg


def test_a_model_with_a_hint_appends_it():
    class Row(Model):
        hint = "recapture it"
        n: int

    with pytest.raises(BadInputError, match=r"^f:3: n: required key is missing; recapture it$"):
        Row.parse({}, "f:3")


def test_seq_takes_lists_and_keeps_items_strict():
    class S(Options):
        xs: Seq[int] = ()

    assert S.model_validate({"xs": [1, 2]}).xs == (1, 2)
    with pytest.raises(BadInputError, match=r"xs\[1\]: must be an integer, got '2'"):
        S.model_validate({"xs": [1, "2"]})


def test_config_file_reader(tmp_path):
    (tmp_path / "a.json").write_text('{"a": [1,\n 2,]}')
    with pytest.raises(BadInputError, match=r"a\.json:2:4: not valid JSON"):
        read_config_file(tmp_path / "a.json")
    (tmp_path / "a.toml").write_text("a = [1, 2]\n[b]\nc = 'x'\n")
    assert read_config_file(tmp_path / "a.toml") == {"a": [1, 2], "b": {"c": "x"}}
    with pytest.raises(BadInputError, match=r"^thing .*none\.json: file not found; make one$"):
        read_config_file(tmp_path / "none.json", "thing", "make one")
    (tmp_path / "a.ini").write_text("")
    with pytest.raises(BadInputError, match=r"unknown suffix '\.ini'; use \.json or \.toml"):
        read_config_file(tmp_path / "a.ini")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(BadInputError, match="not valid JSON"):
        read_config_file(tmp_path / "deep.json")
    (tmp_path / "deep.toml").write_text("a = " + "[" * 100_000)
    with pytest.raises(BadInputError, match="not valid TOML"):
        read_config_file(tmp_path / "deep.toml")
