"""Corruption of k of n shards (bit flips, truncation, deletion): `tourguide validate` names
exactly those k, `tourguide rotate` and the QA metrics refuse them with the recapture command,
and re-running the capture recomputes exactly those k (counted with inotify), byte-identical to
the originals."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from flows.cli import main as tourguide
from lib.capture.run import run_capture
from lib.capture.spec import CaptureSpec
from lib.core.errors import ChecksumError
from lib.store.corpus import load_texts
from lib.store.shards import read_index, shard_name
from lib.store.validation import validate_indexes
from tests.reliability.helpers import RenameCounter, index_problems, tree_diff, tree_state

N = 8
SEED = 7


@pytest.fixture(scope="module")
def captured(make_tiny, tmp_path_factory) -> tuple[Path, CaptureSpec]:
    spec = CaptureSpec(model=str(make_tiny("qwen3")), batch_size=1)
    out = tmp_path_factory.mktemp("corruption") / "teacher"
    run_capture(spec, load_texts(limit=N), out)
    return out, spec


def damage(path: Path, how: str, rng: random.Random) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flip":  # one bit, anywhere: header length, JSON header or tensor data
        pos = rng.randrange(len(raw))
        raw[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(raw))
    elif how == "truncate":
        path.write_bytes(bytes(raw[: rng.randrange(len(raw))]))
    elif how == "delete":
        path.unlink()
    else:
        raise AssertionError(how)


SCENARIOS = {
    "flip-2": ["flip", "flip"],
    "truncate-2": ["truncate", "truncate"],
    "delete-1": ["delete"],
    "mixed-3": ["flip", "truncate", "delete"],
}


def cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        tourguide(list(argv))
    return exit_.value.code


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_validate_names_exactly_the_damaged_shards_and_capture_recomputes_them(captured, tmp_path, scenario,
                                                                               capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # validate answers directly
    base, spec = captured
    rng = random.Random(f"{SEED}-{scenario}")
    out = tmp_path / "acts"
    shutil.copytree(base, out)
    kinds = SCENARIOS[scenario]
    victims = sorted(rng.sample(range(N), len(kinds)))
    for i, how in zip(victims, kinds, strict=True):
        damage(out / shard_name(i), how, rng)
    bad = {shard_name(i) for i in victims}

    assert cli("validate", str(out)) == 1
    printed = capsys.readouterr().out
    named = {line.split()[2].rsplit("/", 1)[-1] for line in printed.splitlines() if line.startswith("BAD")}
    assert named == bad
    assert f"{N} shard(s), {len(bad)} bad" in printed
    assert cli("validate", str(base)) == 0, "negative control: the undamaged copy must validate"
    capsys.readouterr()

    with RenameCounter(out) as renames:
        manifest = run_capture(spec, load_texts(limit=N), out)
        written = renames.shard_writes()
    assert manifest["n_computed"] == len(bad) and dict(written) == {s: 1 for s in bad}
    assert index_problems(out) == [] and all(c.ok for c in validate_indexes([out]))
    assert {r.shard: r.sha256 for r in read_index(out)} == {r.shard: r.sha256 for r in read_index(base)}


def test_rotate_refuses_damaged_shards_and_says_how_to_recapture(prefect_harness, captured, tmp_path, capsys):
    base, _ = captured
    rng = random.Random(SEED)
    student = tmp_path / "student"
    shutil.copytree(base, student)
    for i, how in zip((1, 4, 6), ("flip", "truncate", "delete"), strict=True):
        damage(student / shard_name(i), how, rng)
    rot = tmp_path / "rotations"
    before = tree_state(tmp_path)
    code = cli("rotate", "--student-index", str(student), "--teacher-index", str(base), "--output-dir", str(rot),
               "--spec-out", str(tmp_path / "transforms.json"))
    err = capsys.readouterr().err
    assert code == ChecksumError.exit_code == 2
    assert "tourguide rotate: error: 3 of 16 shard(s) failed their checksum" in err  # both indexes are checked
    for i in (1, 4, 6):
        assert shard_name(i) in err
    assert all(shard_name(i) not in err for i in (0, 2, 3, 5, 7))
    assert "re-run the same `tourguide capture` command into the same --output-dir" in err
    # The one thing a failed command leaves is its log (the error line names it): nothing else.
    log = tmp_path / "logs" / "rotate-rotations.log"
    assert f"log: {log}" in err and log.is_file()
    after = {p: v for p, v in tree_state(tmp_path).items() if not str(p).startswith(str(log.parent))}
    after[str(tmp_path)] = before.get(str(tmp_path), after.get(str(tmp_path)))  # the folder's mtime: logs/ was added
    assert tree_diff(before, after) == [], "rotate wrote something from damaged input"


def test_qa_metrics_refuse_damaged_shards(captured, tmp_path):
    """QA's metric step (lib.qa.compare.compare_captures, behind `tourguide qa`) checks checksums
    first; the QA flow's own capture step then recomputes exactly the damaged shards."""
    from lib.qa.compare import compare_captures

    base, _ = captured
    variant = tmp_path / "variant"
    shutil.copytree(base, variant)
    rng = random.Random(SEED)
    damage(variant / shard_name(2), "flip", rng)
    damage(variant / shard_name(5), "delete", rng)
    with pytest.raises(ChecksumError) as err:
        compare_captures(base, variant, metrics=["logit_kl"])
    msg = str(err.value)
    assert "2 of 8 shard(s) failed their checksum" in msg and shard_name(2) in msg and shard_name(5) in msg
    assert all(shard_name(i) not in msg for i in (0, 1, 3, 4, 6, 7))
    assert "re-run the same `tourguide capture` command" in msg
    shutil.rmtree(variant)
    shutil.copytree(base, variant)  # negative control: the same comparison on intact shards runs
    assert compare_captures(base, variant, metrics=["logit_kl"]).values
