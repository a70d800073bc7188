"""`tourguide pipeline` on real tiny checkpoints: flags only, a config file under flag overrides,
a re-run served from the caches, a changed config refused, different widths (--pca-dim), a
bf16 sharded tied student with an fp16 teacher.

Three pipeline runs in all (each ~20-40 s on 2 cores), shared across assertions: the flags-only
run (module fixture `flags_run`) is also the one re-run and the one a changed config is refused
against. The command runs in this process (its own parser and `run`), so `count_forwards` and
monkeypatches see the flow's tasks; the refusal is checked in a subprocess too (exit code,
message, and that Prefect was never imported).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lib.core.errors import BadInputError, ModelLoadError
from lib.store.ledgers import read_ledger
from lib.store.safetensors_io import read_header

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--max-length", "24", "--batch-size", "8"]


def pipeline(*argv: str) -> str:
    """Run `tourguide pipeline ARGV` in this process; returns what it printed."""
    from flows.cli import build_parser

    args = build_parser().parse_args(["pipeline", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue()


def layer_rows(out: str) -> dict[str, tuple[str, ...]]:
    """{layer: (cos before, cos after, cos global)} from the summary's transport table."""
    return {m[1]: m.groups()[1:] for m in re.finditer(r"^\s+(model\.layers\.\d+)\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)}


def qa_rows(out: str) -> dict[str, tuple[str, ...]]:
    block = out.split("QA (teacher vs each variant", 1)[1].split("Report:", 1)[0]
    return {m[1]: m.groups()[1:] for m in re.finditer(r"^\s+(teacher|student-[a-z]+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$",
                                                       block, re.M)}


def resave(src: Path, out: Path, dtype: str, max_shard_size: str | None = None) -> Path:
    """`src` loaded in `dtype` and written back with save_pretrained (sharded when asked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(make_tiny, tmp_path_factory):
    """A tiny fp32 Qwen3 teacher and a student = the teacher with a planted rotation and head /
    neuron permutations (no noise): exactly the teacher's function in scrambled coordinates."""
    from lib.demo.planted import plant_student

    teacher = make_tiny("qwen3")
    student = tmp_path_factory.mktemp("pair") / "student"
    plant_student(teacher, student, seed=1, noise=0.0)
    return teacher, student


@pytest.fixture(scope="module")
def flags_run(prefect_harness, pair, tmp_path_factory):
    teacher, student = pair
    runs = tmp_path_factory.mktemp("runs")
    argv = ["--teacher", str(teacher), "--student", str(student), "--runs-root", str(runs), "--run-id", "flags",
            "--limit", "8", *SMALL]
    return {"argv": argv, "out": pipeline(*argv), "run_dir": runs / "flags", "runs": runs}


@pytest.mark.slow
def test_flags_only_prints_the_summary_and_records_the_config(flags_run, pair):
    out, run_dir = flags_run["out"], flags_run["run_dir"]
    assert out.startswith("OfflineTourGuide pipeline — run flags") and "Recovery" not in out
    rows = layer_rows(out)
    assert sorted(rows) == ["model.layers.0", "model.layers.1"]
    for before, after, glob in rows.values():
        assert float(after) > 0.999 and float(glob) > 0.999
        assert abs(float(before)) < 0.5, "negative control: the planted rotation scrambles the basis"
    gate = re.search(r"Equivalence gate \((\w+)\): max\|Δlogit\| (\S+), mean KL (\S+)", out)
    assert gate and gate[1] == "passed" and float(gate[3].rstrip(",")) < 1e-9
    # The QA table agrees with the metrics ledger (an independent read of what QA recorded).
    metrics = read_ledger(run_dir / "ledgers" / "metrics", "metrics")
    kl = metrics[(metrics.metric == "logit_kl") & metrics["sample"].isna()].groupby("variant")["value"].last()
    qa = qa_rows(out)
    assert set(qa) == {"teacher", "student-baseline", "student-rotated", "student-folded"}
    for variant in ("student-baseline", "student-rotated", "student-folded"):
        assert float(qa[variant][0]) == pytest.approx(kl[variant], rel=1e-3, abs=1e-15)
    assert float(qa["student-folded"][2]) > 0.999 and abs(float(qa["student-baseline"][2])) < 0.5
    report = out.rsplit("Report: ", 1)[1].strip()
    assert Path(report) == run_dir / "report.md" and Path(report).stat().st_size > 0
    record = json.loads((run_dir / "pipeline.json").read_text())
    teacher, student = pair
    assert record["config"]["teacher"] == str(teacher) and record["config"]["limit"] == 8
    assert record["config"]["max_length"] == 24 and record["compared"]["device"] == "auto"
    assert record["compared"]["student_revision"].startswith("sha256:") and "batch_size" not in record["compared"]


@pytest.mark.slow
def test_rerun_is_served_from_the_caches(flags_run, count_forwards, monkeypatch):
    import flows.pipeline

    run_dir = flags_run["run_dir"]
    folded = run_dir / "checkpoints" / "student-folded"
    stamps = {f.name: f.stat().st_mtime_ns for f in folded.iterdir()}
    n_metrics = len(read_ledger(run_dir / "ledgers" / "metrics", "metrics"))

    def no_fold(**kw):
        raise AssertionError("the fold ran again although its inputs are unchanged")

    monkeypatch.setattr(flows.pipeline, "fold_flow", no_fold)
    again = pipeline(*flags_run["argv"])
    assert count_forwards["n"] == 0, "a re-run must not run a forward pass (captures are cached)"
    assert {f.name: f.stat().st_mtime_ns for f in folded.iterdir()} == stamps
    assert len(read_ledger(run_dir / "ledgers" / "metrics", "metrics")) == n_metrics, "tonight's QA is cached"
    assert layer_rows(again) == layer_rows(flags_run["out"]) and qa_rows(again) == qa_rows(flags_run["out"])


def _tourguide_noting_prefect(*argv: str) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom flows.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
            "    print('PREFECT ' + ('imported' if any(m.split('.')[0] == 'prefect' for m in sys.modules) else "
            "'not imported'), file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)


@pytest.mark.slow
def test_a_changed_config_under_the_same_run_id_is_refused(flags_run):
    run_dir = flags_run["run_dir"]
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    argv = [a if a != "8" else "12" for a in flags_run["argv"]] + ["--no-solve-permutations"]
    res = _tourguide_noting_prefect("pipeline", *argv)
    assert res.returncode == 2, res.stderr
    assert "already holds a pipeline run with a different config" in res.stderr
    assert "limit: 8 → 12" in res.stderr and "solve_permutations: true → false" in res.stderr
    assert "max_length" not in res.stderr.split("Fix:")[0], "only what differs is listed"
    assert "PREFECT not imported" in res.stderr, "refused before Prefect starts"
    assert sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before
    # Fields that change no result may differ: another batch size continues the same run.
    out = pipeline(*flags_run["argv"], "--batch-size", "3", "--dry-run")
    assert "continues the recorded run" in out and json.loads(out.split("\nrun folder")[0])["batch_size"] == 3


@pytest.mark.slow
def test_config_file_with_flag_overrides_on_a_bf16_sharded_tied_student(prefect_harness, make_tiny, tmp_path,
                                                                       count_forwards):
    """fp16 teacher, bf16 student in four shards with tied embeddings (an unrelated seed: the
    fold must untie, rotate in float64 and write bf16 shards that pass the bf16 gate)."""
    teacher = resave(make_tiny("llama", tie=True, seed=5), tmp_path / "teacher-fp16", "float16")
    student = resave(make_tiny("llama", tie=True, seed=6), tmp_path / "student-bf16", "bfloat16", "200KB")
    assert len(list(student.glob("*.safetensors"))) > 1
    cfg = tmp_path / "align.toml"
    cfg.write_text(f'teacher = "{teacher}"\nstudent = "{student}"\nruns_root = "{tmp_path / "runs"}"\n'
                   'run_id = "from-file"\nlimit = 6\nmax_length = 24\nlayers = ["model.layers.1"]\n'
                   'solve_permutations = false\nmetrics = ["logit_kl", "hidden_state_cosine"]\n')
    out = pipeline("--config", str(cfg), "--limit", "4", "--run-id", "from-flags")
    run_dir = tmp_path / "runs" / "from-flags"
    assert not (tmp_path / "runs" / "from-file").exists()
    record = json.loads((run_dir / "pipeline.json").read_text())["config"]
    assert record["limit"] == 4 and record["run_id"] == "from-flags"  # the flags
    assert record["max_length"] == 24 and record["layers"] == ["model.layers.1"]  # the file
    assert record["solve_permutations"] is False and record["metrics"] == ["logit_kl", "hidden_state_cosine"]
    assert record["batch_size"] == 8  # the model's default
    assert count_forwards["n"] > 0, "positive control for the cache test: a new run captures"
    assert list(layer_rows(out)) == ["model.layers.1"]
    assert re.search(r"Transports: \d+ paired tokens from 4 samples", out)
    # Captures store float32 (the default) whatever the checkpoint's dtype.
    shard = next((run_dir / "activations" / "transport-student").glob("*.safetensors"))
    assert read_header(shard).tensors["act/model.layers.1"].dtype == "F32"
    # The fold reads all four shards, keeps the student's dtype (its own shard size: one file
    # here), unties lm_head, and passes the bf16 gate (reloaded with from_pretrained).
    folded = run_dir / "checkpoints" / "student-folded"
    dtypes = {i.dtype for f in folded.glob("*.safetensors") for i in read_header(f).tensors.values()}
    assert dtypes == {"BF16"}
    config = json.loads((folded / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert any("lm_head.weight" in read_header(f).tensors for f in folded.glob("*.safetensors"))
    report = json.loads((folded / "fold_report.json").read_text())
    assert report["gate"]["status"] == "passed" and report["gate"]["checkpoint_dtype"] == "bfloat16"
    assert "Equivalence gate (passed)" in out
    assert set(qa_rows(out)) == {"teacher", "student-baseline", "student-rotated", "student-folded"}


@pytest.mark.slow
def test_different_widths_align_in_pca_space_without_a_fold(prefect_harness, make_tiny, tmp_path):
    teacher = make_tiny("qwen3")  # hidden 128
    student = make_tiny("qwen3", tie=True, hidden_size=96, seed=2)
    base = ["--teacher", str(teacher), "--student", str(student), "--runs-root", str(tmp_path / "runs"),
            "--run-id", "pca", "--limit", "6", *SMALL]
    with pytest.raises(BadInputError, match=r"hidden size is 96 and the teacher's 128: pass --pca-dim"):
        pipeline(*base)
    with pytest.raises(BadInputError, match=r"--pca-dim 100 is larger than the smaller width 96"):
        pipeline(*base, "--pca-dim", "100")
    assert not (tmp_path / "runs").exists(), "refused input writes nothing"
    out = pipeline(*base, "--pca-dim", "16")
    run_dir = tmp_path / "runs" / "pca"
    assert "PCA: student 96 and teacher 128 dims → 16" in out
    assert "Fold and equivalence gate: skipped (--pca-dim 16" in out and "Equivalence gate (" not in out
    assert not (run_dir / "checkpoints" / "student-folded").exists()
    for before, after, _ in layer_rows(out).values():
        assert before == "—" and 0 < float(after) <= 1
    qa = qa_rows(out)
    assert set(qa) == {"teacher", "student-pca"}
    # QA's cosine through the PCA map (its own captures, lib.qa.transports) agrees with the
    # rotate step's cosine under the pooled map (lib.transport.pool), layer mean, same tokens
    pooled = [float(g) for _, _, g in layer_rows(out).values()]
    assert float(qa["student-pca"][2]) == pytest.approx(sum(pooled) / len(pooled), abs=2e-4)
    assert float(qa["student-pca"][2]) < 0.99, "negative control: unrelated models stay apart"
    variants = json.loads((run_dir / "eval_config.json").read_text())["variants"]
    assert [v["transports"][0]["kind"] for v in variants] == ["pca_adapter"]
    assert not (run_dir / "rotations" / "permutations").exists(), "no permutations without a fold"


BAD = [
    (["--teacher", "{t}", "--student", "{s}", "--layers", "model.layers.7"], BadInputError, r"not decoder blocks"),
    (["--teacher", "{t}", "--student", "{s}", "--limit", "0"], BadInputError, r"command line: limit: must be >= 1, got 0"),
    (["--teacher", "{t}", "--student", "{s}", "--metrics", "bleu"], BadInputError, r"metrics\[0\]: unknown metric 'bleu'"),
    (["--student", "{s}"], BadInputError, r"--teacher is required: give it on the command line or as `teacher` in --config"),
    (["--teacher", "nobody/no-such-model", "--student", "{s}"], ModelLoadError, r"'nobody/no-such-model' .* not in the HF cache at"),
    (["--teacher", "{t}", "--student", "{s}", "--config", "{bad_key}"], BadInputError,
     r"bad.toml: teacherr: unknown key \(did you mean 'teacher'\?\)"),
    (["--teacher", "{t}", "--student", "{s}", "--config", "{bad_item}"], BadInputError,
     r"items.json: layers\[1\]: must be a string, got 3"),
    (["--teacher", "{t}", "--student", "{wide}", "--pca-dim", "8", "--solve-permutations"], None, None),
    (["--teacher", "{t}", "--student", "{heads}"], BadInputError, r"query heads 8 vs 4.*--no-solve-permutations"),
    (["--teacher", "{t}", "--student", "{s}", "--runs-root", "{file}"], BadInputError, r"is a file, not a folder"),
    (["--teacher", "{t}", "--student", "{s}", "--use-deployments"], BadInputError, r"needs a Prefect server"),
]


@pytest.mark.parametrize("argv,exc,needle", BAD)
def test_bad_input_is_refused_before_the_flow(make_tiny, tmp_path, monkeypatch, argv, exc, needle):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    (tmp_path / "bad.toml").write_text('teacherr = "x"\n')
    (tmp_path / "items.json").write_text('{"layers": ["model.layers.0", 3]}')
    (tmp_path / "a-file").write_text("")
    names = {"t": make_tiny("qwen3"), "s": make_tiny("qwen3", seed=1), "wide": make_tiny("qwen3", hidden_size=96),
             "heads": make_tiny("qwen3", num_heads=8, num_kv_heads=2, seed=1), "bad_key": tmp_path / "bad.toml",
             "bad_item": tmp_path / "items.json", "file": tmp_path / "a-file"}
    argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
    if "--runs-root" not in argv:
        argv += ["--runs-root", str(tmp_path / "runs")]
    if exc is None:  # permutations asked for with --pca-dim are not solved (nothing folds): accepted
        assert "no fold (--pca-dim)" in pipeline(*argv, "--dry-run")
        return
    with pytest.raises(exc, match=needle):
        pipeline(*argv, "--dry-run")
    assert not (tmp_path / "runs").exists()
