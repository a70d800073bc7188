"""The bad-input catalogue: one table of wrong texts, files, flags, indexes, specs, configs and
checkpoints across every CLI command, each through the real entry point (`flows.cli.main`).

For every case: exit code 2, the exact error class (lib.errors; 'usage' = an argparse error),
the message names the offending thing, no traceback, nothing written anywhere under the test
world or the model folder, and Prefect never imported (bad input fails before Prefect starts).
All cases run in ONE subprocess (a fresh interpreter, so that "prefect was not imported" means
something; this file's own imports would otherwise have loaded it) — see workers.catalogue.

The same table is listed in README.md ("Troubleshooting: the bad-input catalogue"); the last
test checks that every case appears there.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lib.capture.run import run_capture
from lib.capture.spec import CaptureSpec
from lib.store.corpus import Sample
from tests.reliability.helpers import ROOT, subprocess_env, worker_cmd

# id, command line ({M} model, {W} test world, {O} a fresh output path), error class, what the message must name, why
CASES: list[tuple[str, str, str, list[str], str]] = [
    # capture: texts, files, flags, models
    ("capture-empty-text", "capture --model {M} --output-dir {O} --text ''", "BadInputError", ["--text #1 is empty"], "an empty --text"),
    ("capture-text-file-missing", "capture --model {M} --output-dir {O} --text-file {W}/nope.txt", "BadInputError", ["{W}/nope.txt", "not found"], "a --text-file that does not exist"),
    ("capture-text-file-not-utf8", "capture --model {M} --output-dir {O} --text-file {W}/texts/latin1.txt", "BadInputError", ["latin1.txt", "not valid UTF-8", "byte 3"], "a Latin-1 text file"),
    ("capture-text-file-blank", "capture --model {M} --output-dir {O} --text-file {W}/texts/blank.txt", "BadInputError", ["blank.txt", "no non-empty lines"], "a text file of blank lines"),
    ("capture-text-file-is-folder", "capture --model {M} --output-dir {O} --text-file {W}/texts", "BadInputError", ["{W}/texts", "is a folder"], "a folder passed as --text-file"),
    ("capture-max-length-0", "capture --model {M} --output-dir {O} --text hi --max-length 0", "BadInputError", ["--max-length must be >= 1"], "--max-length 0"),
    ("capture-batch-size-0", "capture --model {M} --output-dir {O} --text hi --batch-size 0", "BadInputError", ["--batch-size must be >= 1"], "--batch-size 0"),
    ("capture-limit-0", "capture --model {M} --output-dir {O} --text hi --limit 0", "BadInputError", ["--limit must be positive"], "--limit 0"),
    ("capture-unknown-layer", "capture --model {M} --output-dir {O} --text hi --layer model.layers.99", "BadInputError", ["model.layers.99", "model.layers.0"], "a --layer the model does not have"),
    ("capture-bad-dtype", "capture --model {M} --output-dir {O} --text hi --dtype float8", "usage", ["--dtype", "float8"], "an unknown --dtype"),
    ("capture-output-is-file", "capture --model {M} --output-dir {W}/file.txt --text hi", "BadInputError", ["{W}/file.txt", "is a file"], "--output-dir naming a file"),
    ("capture-model-missing", "capture --model {W}/no-such-model --output-dir {O} --text hi", "ModelLoadError", ["{W}/no-such-model", "not found"], "a model folder that does not exist"),
    ("capture-model-no-config", "capture --model {W}/ckpt-noconfig --output-dir {O} --text hi", "ModelLoadError", ["ckpt-noconfig", "no config.json"], "a folder without config.json"),
    ("capture-model-name-too-long", "capture --model " + "n" * 300 + " --output-dir {O} --text hi", "ModelLoadError", ["nnnnnnnn", "not in the HF cache"], "a 300-character model name (found by fuzzing: OSError)"),
    ("capture-hub-id-offline", "capture --model Qwen/Qwen3-0.6B --hf-hub-cache {W}/emptyhub --output-dir {O} --text hi", "ModelLoadError", ["Qwen/Qwen3-0.6B", "{W}/emptyhub", "HF_HUB_OFFLINE"], "a hub id not in the offline cache"),
    # validate
    ("validate-index-missing", "validate {W}/no-such-index", "BadInputError", ["no-such-index", "not found"], "an index path that does not exist"),
    ("validate-index-malformed", "validate {W}/idx/malformed", "BadInputError", ["metadata.jsonl:2", "malformed JSON"], "a metadata.jsonl line that is not JSON"),
    ("validate-index-missing-key", "validate {W}/idx/missing_key", "BadInputError", ["metadata.jsonl:1", "sha256"], "an index row without its sha256"),
    ("validate-index-path-escape", "validate {W}/idx/escape", "BadInputError", ["../../etc/passwd", "plain file name"], "an index row whose shard path leaves the folder"),
    # analyze
    ("analyze-missing", "analyze {W}/nothing-here", "BadInputError", ["nothing-here", "not found"], "a path that does not exist"),
    ("analyze-wrong-suffix", "analyze {W}/file.txt", "BadInputError", ["file.txt", "unsupported file type"], "a file that is neither .safetensors nor .pt"),
    ("analyze-empty-folder", "analyze {W}/emptydir", "BadInputError", ["emptydir", "no .safetensors or .pt"], "a folder without shards"),
    ("analyze-garbage-safetensors", "analyze {W}/garbage.safetensors", "BadInputError", ["garbage.safetensors", "not a readable safetensors"], "random bytes named .safetensors"),
    ("analyze-malicious-pickle", "analyze {W}/evil.pt", "BadInputError", ["evil.pt", "weights_only=True"], "a .pt pickle that would run `touch pwned`"),
    # rotate
    ("rotate-student-missing", "rotate --student-index {W}/nope --teacher-index {W}/acts/teacher --output-dir {O}", "BadInputError", ["{W}/nope", "not found"], "a missing --student-index"),
    ("rotate-index-malformed", "rotate --student-index {W}/idx/malformed --teacher-index {W}/acts/teacher --output-dir {O}", "BadInputError", ["metadata.jsonl:2", "malformed JSON"], "a malformed student index"),
    ("rotate-index-empty", "rotate --student-index {W}/idx/empty --teacher-index {W}/acts/teacher --output-dir {O}", "BadInputError", ["idx/empty", "no rows"], "an empty index"),
    ("rotate-layer-not-captured", "rotate --student-index {W}/acts/student --teacher-index {W}/acts/teacher --layer model.layers.5 --output-dir {O}", "BadInputError", ["model.layers.5", "--layer model.layers.5"], "a --layer that was not captured"),
    ("rotate-pca-dim-0", "rotate --student-index {W}/acts/student --teacher-index {W}/acts/teacher --pca-dim 0 --output-dir {O}", "BadInputError", ["--pca-dim must be >= 1"], "--pca-dim 0"),
    ("rotate-pca-dim-too-big", "rotate --student-index {W}/acts/student --teacher-index {W}/acts/teacher --pca-dim 999 --output-dir {O}", "BadInputError", ["--pca-dim 999", "128"], "--pca-dim above the hidden size"),
    ("rotate-layer-weight-syntax", "rotate --student-index {W}/acts/student --teacher-index {W}/acts/teacher --layer-weight heavy --output-dir {O}", "usage", ["LAYER=WEIGHT", "heavy"], "a --layer-weight without '='"),
    ("rotate-layer-weight-negative", "rotate --student-index {W}/acts/student --teacher-index {W}/acts/teacher --layer-weight model.layers.0=-1 --output-dir {O}", "BadInputError", ["model.layers.0=-1.0", ">= 0"], "a negative --layer-weight"),
    ("rotate-ledger-suffix", "rotate --student-index {W}/acts/student --teacher-index {W}/acts/teacher --ledger {W}/rot.csv --output-dir {O}", "BadInputError", ["rot.csv", ".jsonl"], "a --ledger that is neither .jsonl nor parquet"),
    ("rotate-spec-out-suffix", "rotate --student-index {W}/acts/student --teacher-index {W}/acts/teacher --spec-out {W}/transforms.yaml --output-dir {O}", "BadInputError", ["transforms.yaml", ".json"], "a --spec-out that is not .json"),
    ("rotate-no-common-sample", "rotate --student-index {W}/acts/student --teacher-index {W}/acts/other --output-dir {O}", "BadInputError", ["no sample is in both captures"], "captures of different texts"),
    # fold: specs
    ("fold-spec-missing", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/none.json", "BadInputError", ["none.json", "spec file not found"], "a --spec that does not exist"),
    ("fold-spec-not-json", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/broken.json", "BadInputError", ["broken.json", "not valid JSON"], "a spec that is not JSON"),
    ("fold-spec-layers-not-list", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/layers_dict.json", "BadInputError", ["layers_dict.json", "'layers' must be a list"], "'layers' as an object"),
    ("fold-spec-unknown-key", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/unknown_key.json", "BadInputError", ["unknown transform key", "shear_path"], "a transform key this build does not know"),
    ("fold-spec-path-escape", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/escape.json", "BadInputError", ["../outside/global.safetensors", "outside the run directory", "--allow-outside-paths"], "a spec path leaving the run dir"),
    ("fold-spec-file-missing", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/dangling.json", "BadInputError", ["rotations/gone.safetensors", "not found"], "a spec naming a missing tensor file"),
    ("fold-spec-wrong-shape", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/small/transforms.json", "BadInputError", ["global.safetensors", "[64, 64]", "[128, 128]"], "a 64×64 rotation for a 128-wide model"),
    ("fold-spec-not-orthogonal", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/skew/transforms.json", "BadInputError", ["orthogonal"], "a rotation that is not orthogonal"),
    ("fold-spec-gqa-break", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/gqa/transforms.json", "NotExactError", ["model.layers.0", "GQA", "--allow-inexact"], "a head permutation across kv groups"),
    ("fold-spec-bad-layer", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/bad_layer.json", "BadInputError", ["model.layers.7", "not a decoder block"], "a layer the checkpoint does not have"),
    ("fold-spec-model-type", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/llama.json", "BadInputError", ["'llama'", "qwen3"], "a spec solved for another model type"),
    # fold: checkpoints and flags
    ("fold-checkpoint-no-config", "fold --checkpoint {W}/ckpt-noconfig --output-dir {O} --spec {W}/run/good/transforms.json", "ModelLoadError", ["ckpt-noconfig", "no config.json"], "a checkpoint folder without config.json"),
    ("fold-checkpoint-truncated", "fold --checkpoint {W}/ckpt-truncated --output-dir {O} --spec {W}/run/good/transforms.json", "BadInputError", ["ckpt-truncated/model.safetensors", "tensor 'model.embed_tokens.weight'", "truncated"], "a model.safetensors cut short (was accepted; the fold then died after Prefect started)"),
    ("fold-output-is-source", "fold --checkpoint {M} --output-dir {M} --spec {W}/run/good/transforms.json", "BadInputError", ["never overwrites its source"], "--output-dir = the source checkpoint"),
    ("fold-output-not-empty", "fold --checkpoint {M} --output-dir {W}/nonempty --spec {W}/run/good/transforms.json", "BadInputError", ["{W}/nonempty", "--overwrite"], "a non-empty --output-dir without --overwrite"),
    ("fold-shard-size", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/good/transforms.json --max-shard-size lots", "BadInputError", ["'lots'", "2GB"], "an unreadable --max-shard-size"),
    ("fold-probe-texts-0", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/good/transforms.json --probe-texts 0", "BadInputError", ["--probe-texts"], "--probe-texts 0"),
    ("fold-bad-dtype", "fold --checkpoint {M} --output-dir {O} --spec {W}/run/good/transforms.json --dtype float8", "usage", ["--dtype", "float8"], "an unknown --dtype"),
    # scaffold
    ("scaffold-run-id-escape", "scaffold --run-id ../escape --runs-root {W}/runs", "BadInputError", ["'../escape'", "--run-id"], "a run id that would leave the runs root"),
    ("scaffold-no-samples", "scaffold --run-id r1 --runs-root {W}/runs --samples-dir {W}/emptydir", "BadInputError", ["emptydir", "*.txt"], "a samples folder without *.txt"),
    ("scaffold-prompt-missing", "scaffold --run-id r1 --runs-root {W}/runs --prompt nope.md", "BadInputError", ["'nope.md'", "not found"], "a --prompt file that does not exist"),
    # qa: eval configs
    ("qa-config-missing", "qa --config {W}/qa/none.toml", "BadInputError", ["none.toml", "not found"], "a --config that does not exist"),
    ("qa-config-suffix", "qa --config {W}/qa/config.yaml", "BadInputError", ["config.yaml", ".json or .toml"], "a config that is neither JSON nor TOML"),
    ("qa-config-bad-json", "qa --config {W}/qa/broken.json", "BadInputError", ["broken.json", "not valid JSON"], "a JSON config with a syntax error"),
    ("qa-config-bad-toml", "qa --config {W}/qa/broken.toml", "BadInputError", ["broken.toml", "not valid TOML"], "a TOML config with a syntax error"),
    ("qa-config-unknown-key", "qa --config {W}/qa/unknown_key.toml", "BadInputError", ["variants[0].colour", "unknown key"], "an unknown key inside a variant"),
    ("qa-config-wrong-type", "qa --config {W}/qa/wrong_type.json", "BadInputError", ["batch_size", "integer"], "batch_size as a string"),
    ("qa-config-unknown-metric", "qa --config {W}/qa/metric.json", "BadInputError", ["metrics[0]", "'bleu'"], "a metric QA does not compute"),
    ("qa-config-transport-missing", "qa --config {W}/qa/transport.json", "BadInputError", ["variants[0].transports[0].path", "gone.safetensors"], "a transport file that does not exist"),
    ("qa-run-not-scaffolded", "qa --config {W}/qa/unscaffolded.json", "BadInputError", ["never scaffolded", "tourguide scaffold --run-id nope"], "a run that was never scaffolded"),
    # report
    ("report-run-not-scaffolded", "report --run-id nope --runs-root {W}/runs", "BadInputError", ["'nope'", "never scaffolded"], "a run id with no manifest"),
    ("report-run-id-escape", "report --run-id ../../etc --runs-root {W}/runs", "BadInputError", ["'../../etc'", "--run-id"], "a run id that would leave the runs root"),
    # pipeline: flags, config files, models, the run's recorded config
    ("pipeline-teacher-missing", "pipeline --student {M} --runs-root {W}/runs", "BadInputError", ["--teacher is required", "--config"], "no --teacher (flag or config key)"),
    ("pipeline-config-unknown-key", "pipeline --config {W}/pipe/unknown_key.toml", "BadInputError", ["unknown_key.toml: limt: unknown key", "did you mean 'limit'"], "a misspelt key in the --config file"),
    ("pipeline-limit-0", "pipeline --teacher {M} --student {M} --runs-root {W}/runs --limit 0", "BadInputError", ["command line: limit: must be >= 1"], "--limit 0"),
    ("pipeline-bad-dtype", "pipeline --teacher {M} --student {M} --runs-root {W}/runs --dtype float8", "usage", ["--dtype", "float8"], "an unknown --dtype"),
    ("pipeline-hub-id-offline", "pipeline --teacher Qwen/Qwen3-0.6B --student {M} --hf-hub-cache {W}/emptyhub --runs-root {W}/runs", "ModelLoadError", ["Qwen/Qwen3-0.6B", "{W}/emptyhub"], "a teacher hub id not in the offline cache"),
    ("pipeline-widths-differ", "pipeline --teacher {M} --student {W}/ckpt-narrow --runs-root {W}/runs", "BadInputError", ["hidden size is 96 and the teacher's 128", "--pca-dim"], "a narrower student without --pca-dim"),
    ("pipeline-config-changed", "pipeline --teacher {M} --student {M} --runs-root {W}/runs --run-id recorded --limit 9", "BadInputError", ["different config", "limit: 8 → 9", "--run-id"], "another config under a run id that recorded one"),
]

# The bytes of a protocol-2 pickle calling os.system("touch <W>/pwned"), written by hand (no pickle module).
def evil_pickle(target: Path) -> bytes:
    cmd = f"touch {target}".encode()
    return b"\x80\x02cposix\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."


def _config(path: Path, **over) -> Path:
    cfg = {"run_id": "r1", "runs_root": str(path.parent.parent / "runs"), "teacher": {"path": over.pop("_model")},
           "variants": [{"name": "v", "path": over.pop("_variant", None) or "x"}]}
    cfg["variants"][0]["path"] = cfg["teacher"]["path"]
    cfg.update(over)
    path.write_text(json.dumps(cfg))
    return path


def build_world(w: Path, model: Path) -> None:
    """Every bad file the table names, plus good captures and a scaffolded run to be wrong about."""
    from safetensors.numpy import save_file

    from lib.fold.spec import write_transform_spec
    from lib.store.runs import ScaffoldSpec, scaffold_run
    from lib.testing.random_transforms import random_head_permutation, random_rotation

    spec = CaptureSpec(model=str(model), max_length=16)
    texts = ["Bondi Beach at dawn.", "外滩的万国建筑群。", "Machu Picchu above the clouds."]
    run_capture(spec, [Sample(i, f"t{i}", t) for i, t in enumerate(texts)], w / "acts" / "student")
    shutil.copytree(w / "acts" / "student", w / "acts" / "teacher")
    run_capture(spec, [Sample(0, "o0", "Something else entirely.")], w / "acts" / "other")
    (w / "texts").mkdir()
    (w / "texts" / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (w / "texts" / "blank.txt").write_text("\n   \n\t\n")
    (w / "file.txt").write_text("not a folder\n")
    (w / "emptydir").mkdir()
    (w / "emptyhub").mkdir()
    (w / "nonempty").mkdir()
    (w / "nonempty" / "keep.txt").write_text("keep me")
    (w / "ckpt-noconfig").mkdir()
    (w / "ckpt-noconfig" / "model.safetensors").write_bytes(b"\0" * 16)
    shutil.copytree(model, w / "ckpt-truncated")  # its data cut off halfway through the embedding
    weights = w / "ckpt-truncated" / "model.safetensors"
    (n,) = struct.unpack("<Q", weights.read_bytes()[:8])
    begin, end = json.loads(weights.read_bytes()[8:8 + n])["model.embed_tokens.weight"]["data_offsets"]
    with open(weights, "r+b") as fh:
        fh.truncate(8 + n + (begin + end) // 2)
    (w / "garbage.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    (w / "evil.pt").write_bytes(evil_pickle(w / "pwned"))
    good = (w / "acts" / "student" / "metadata.jsonl").read_text().splitlines()
    for name, text in {"malformed": good[0] + "\n{oops\n",
                       "missing_key": json.dumps({k: v for k, v in json.loads(good[0]).items() if k != "sha256"}) + "\n",
                       "escape": json.dumps({**json.loads(good[0]), "shard": "../../etc/passwd"}) + "\n",
                       "empty": ""}.items():
        (w / "idx" / name).mkdir(parents=True)
        (w / "idx" / name / "metadata.jsonl").write_text(text)
    # transforms specs in a run dir (ledgers/ marks the run root: spec paths must stay inside)
    run = w / "run"
    (run / "ledgers").mkdir(parents=True)
    cfg = json.loads((model / "config.json").read_text())
    write_transform_spec(run / "good", cfg, residual_rotation=random_rotation(128, 1))
    write_transform_spec(run / "small", cfg, residual_rotation=random_rotation(64, 1))
    write_transform_spec(run / "skew", cfg, residual_rotation=np.random.default_rng(2).normal(size=(128, 128)))
    perm = random_head_permutation(4, 2, 0)
    write_transform_spec(run / "gqa", cfg, head_permutations={0: np.array([0, 2, 1, 3])})
    assert not np.array_equal(perm, [0, 2, 1, 3])
    (w / "outside").mkdir()
    save_file({"rotation": random_rotation(128, 3)}, str(w / "outside" / "global.safetensors"))
    specs = {
        "broken.json": "{\"version\": 1, \"layers\": [",
        "layers_dict.json": json.dumps({"version": 1, "layers": {"model.layers.0": {}}}),
        "unknown_key.json": json.dumps({"version": 1, "layers": [{"name": "model.layers.0", "shear_path": "x"}]}),
        "escape.json": json.dumps({"version": 1, "residual_rotation_path": "../outside/global.safetensors", "layers": []}),
        "dangling.json": json.dumps({"version": 1, "residual_rotation_path": "rotations/gone.safetensors", "layers": []}),
        "bad_layer.json": json.dumps({"version": 1, "layers": [{"name": "model.layers.7", "neuron_permutation_path": None}]}),
        "llama.json": json.dumps({"version": 1, "model_type": "llama", "layers": []}),
    }
    for name, text in specs.items():
        (run / name).write_text(text)
    # pipeline: a config file with a misspelt key, a narrower student (config.json is all the
    # checks read), and a run id that already recorded a config
    (w / "pipe").mkdir()
    (w / "pipe" / "unknown_key.toml").write_text(f'teacher = "{model}"\nstudent = "{model}"\nlimt = 3\n')
    (w / "ckpt-narrow").mkdir()
    (w / "ckpt-narrow" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))
    from lib.pipeline.config import PipelineConfig
    from lib.pipeline.run_record import claim_run

    claim_run(PipelineConfig(teacher=str(model), student=str(model), runs_root=str(w / "runs"), run_id="recorded", limit=8))
    # eval configs, and one scaffolded run for them to point at
    scaffold_run(ScaffoldSpec(run_id="r1", runs_root=str(w / "runs")))
    qa = w / "qa"
    qa.mkdir()
    (qa / "config.yaml").write_text("run_id: r1\n")
    (qa / "broken.json").write_text('{"run_id": "r1",')
    (qa / "broken.toml").write_text('run_id = "r1\n')
    (qa / "unknown_key.toml").write_text(f'run_id = "r1"\nruns_root = "{w / "runs"}"\n[teacher]\npath = "{model}"\n'
                                         f'[[variants]]\nname = "v"\npath = "{model}"\ncolour = "red"\n')
    _config(qa / "wrong_type.json", _model=str(model), batch_size="8")
    _config(qa / "metric.json", _model=str(model), metrics=["bleu"])
    _config(qa / "unscaffolded.json", _model=str(model), run_id="nope")
    t = _config(qa / "transport.json", _model=str(model))
    data = json.loads(t.read_text())
    data["variants"][0]["transports"] = [{"kind": "rotation", "path": str(w / "gone.safetensors")}]
    t.write_text(json.dumps(data))


def _fill(text: str, world: Path, model: Path, case_id: str) -> str:
    return text.replace("{W}", str(world)).replace("{M}", str(model)).replace("{O}", str(world / "out" / case_id))


@pytest.fixture(scope="module")
def outcomes(make_tiny, tmp_path_factory) -> dict[str, dict]:
    import shlex

    model = make_tiny("qwen3")
    world = tmp_path_factory.mktemp("catalogue") / "world"
    world.mkdir()
    build_world(world, model)
    cases = [{"id": cid, "argv": [_fill(a, world, model, cid) for a in shlex.split(cmd)], "watch": [str(world), str(model)]}
             for cid, cmd, *_ in CASES]
    jobs = world.parent / "cases.json"
    results = world.parent / "results.json"
    jobs.write_text(json.dumps(cases))
    env = subprocess_env()
    res = subprocess.run(worker_cmd("catalogue", "--cases", jobs, "--results", results), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(results.read_text())
    for cid, r in out.items():
        r["needles"] = [_fill(n, world, model, cid) for n in next(c[3] for c in CASES if c[0] == cid)]
        r["out"] = str(world / "out" / cid)
    return out


def test_the_catalogue_is_big_and_spans_every_command():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1].split()[0] for c in CASES}
    assert commands >= {"capture", "validate", "analyze", "rotate", "fold", "scaffold", "qa", "report", "pipeline"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(outcomes, case):
    cid, _, cls, _, _ = case
    r = outcomes[cid]
    assert r["code"] == 2, r
    if cls == "usage":
        assert "usage: tourguide" in r["stderr"] and r["cls"] in (None, "ArgumentError", "ArgumentTypeError"), r
    else:
        assert r["cls"] == cls, r
        assert r["stderr"].startswith(f"tourguide {case[1].split()[0]}: error: "), r["stderr"]
    for needle in r["needles"]:
        assert needle in r["stderr"], f"{cid}: message does not name {needle!r}:\n{r['stderr']}"
    assert "Traceback" not in r["stderr"]
    assert r["changed"] == [], f"{cid} wrote to disk: {r['changed']}"
    assert not Path(r["out"]).exists()
    assert not r["prefect_imported"], f"{cid} (or a case before it) imported prefect: bad input must fail first"


def test_the_malicious_pickle_is_real(tmp_path):
    """Negative control for `analyze-malicious-pickle`: unrestricted unpickling would have run
    the command; weights_only=True (what analyze uses) refuses it."""
    import torch

    evil, target = tmp_path / "evil.pt", tmp_path / "pwned"
    evil.write_bytes(evil_pickle(target))
    with pytest.raises(Exception, match="posix.system"):
        torch.load(evil, weights_only=True)
    assert not target.exists()
    with pytest.raises(RuntimeError, match="magic number"):  # torch notices only after the code ran
        torch.load(evil, weights_only=False)  # security-scan: deliberate (the unsafe default of old torch)
    assert target.exists()


def test_readme_lists_the_catalogue():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Troubleshooting: the bad-input catalogue" in readme
    section = readme.split("## Troubleshooting: the bad-input catalogue", 1)[1]
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in section]
    assert missing == [], f"README catalogue lacks {missing}; regenerate with catalogue_markdown()"


def catalogue_markdown() -> str:
    """The README table: `python -c 'from tests.reliability.test_bad_inputs import catalogue_markdown as m; print(m())'`."""
    rows = ["| case | command | bad input | error | the message names |", "|---|---|---|---|---|"]
    for cid, cmd, cls, needles, why in CASES:
        shown = ", ".join(f"`{n.replace('{W}/', '').replace('{W}', '').replace('|', '/')}`" for n in needles)
        rows.append(f"| `{cid}` | {cmd.split()[0]} | {why} | {cls if cls != 'usage' else 'usage error (argparse)'} | {shown} |")
    return "\n".join(rows)


if os.environ.get("TOURGUIDE_PRINT_CATALOGUE"):  # pragma: no cover
    print(catalogue_markdown())
