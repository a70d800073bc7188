"""The rotate flow and `tourguide rotate` under a real (test-harness) Prefect API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from flows.cli import main
from flows.rotate import rotate_flow
from lib.core.errors import ChecksumError
from lib.store.ledgers import read_ledger
from lib.store.safetensors_io import load_tensors
from lib.testing.synthetic import write_pair_from_arrays
from lib.transport.options import RotateOptions

LAYERS = ["model.layers.0", "model.layers.1", "model.layers.2"]


@pytest.fixture()
def captures(tmp_path):
    rng = np.random.default_rng(0)
    d, lens = 16, (12, 30, 7, 21)
    r = ortho_group.rvs(d, random_state=1)
    xs = {name: rng.standard_normal((sum(lens), d)) for name in LAYERS}
    ys = {name: xs[name] @ r + 0.2 * rng.standard_normal((sum(lens), d)) for name in LAYERS}
    s, t = write_pair_from_arrays(tmp_path / "acts", xs, ys, lens, rng)
    return s, t, xs, ys


def test_flow_maps_layers_pools_and_appends_ledger_rows(prefect_harness, captures, tmp_path):
    s, t, xs, ys = captures
    kw = dict(student_index=str(s), teacher_index=str(t), layers=LAYERS, output_dir=str(tmp_path / "rot"),
              ledger=str(tmp_path / "ledgers" / "rotations"), spec_out=str(tmp_path / "transforms.json"),
              options=RotateOptions(exclude_position0=True))
    first = rotate_flow(**kw)
    assert [r["layer"] for r in first["layers"]] == LAYERS
    keep = np.ones(len(xs[LAYERS[0]]), bool)
    keep[[0, 12, 42, 49]] = False  # position 0 of each sample
    for row in first["layers"]:
        ref, _ = orthogonal_procrustes(xs[row["layer"]][keep], ys[row["layer"]][keep])
        assert np.max(np.abs(load_tensors(row["rotation_path"])[0]["rotation"] - ref)) <= 1e-8
    q = load_tensors(first["global"]["rotation_path"])[0]["rotation"]
    ref, _ = orthogonal_procrustes(np.vstack([xs[n][keep] for n in LAYERS]), np.vstack([ys[n][keep] for n in LAYERS]))
    assert np.max(np.abs(q - ref)) <= 1e-8
    second = rotate_flow(**{**kw, "run_id": "again"})
    df = read_ledger(tmp_path / "ledgers" / "rotations", "rotations")
    assert len(df) == 6 and sorted(set(df.run_id)) == sorted({first["run_id"], "again"})
    assert df.excluded_position0.all() and (df.n_tokens == 66).all()
    spec = json.loads((tmp_path / "transforms.json").read_text())
    assert spec["residual_rotation_path"] == "rot/global.safetensors" and len(spec["layers"]) == 3
    assert second["table"].splitlines()[0].startswith("layer")


def test_flow_refuses_a_corrupt_shard_before_writing(prefect_harness, captures, tmp_path):
    s, t, _, _ = captures
    victim = t.parent / "sample_0002.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="sample_0002"):
        rotate_flow(student_index=str(s), teacher_index=str(t), layers=LAYERS[:1], output_dir=str(tmp_path / "rot"),
                    ledger=str(tmp_path / "l.jsonl"))
    assert not (tmp_path / "rot").exists() and not (tmp_path / "l.jsonl").exists()


def test_cli_rotate_prints_the_table_and_fails_fast_on_bad_input(prefect_harness, captures, tmp_path, capsys):
    s, t, _, _ = captures
    args = ["rotate", "--student-index", str(s), "--teacher-index", str(t.parent), "--layer", LAYERS[0],
            "--output-dir", str(tmp_path / "rot"), "--ledger", str(tmp_path / "rotations.jsonl"), "--run-id", "cli"]
    with pytest.raises(SystemExit) as ex:
        main(args)
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert "model.layers.0" in out and "cos before" in out and "1 row(s) appended" in out
    rows = [json.loads(x) for x in (tmp_path / "rotations.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in rows] == ["cli"]
    with pytest.raises(SystemExit) as ex:
        main([*args[:-6], "--layer", "model.layers.9", "--output-dir", str(tmp_path / "bad")])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "model.layers.9" in err and "not in the student capture" in err
    assert not (tmp_path / "bad").exists()


def test_a_typo_in_the_options_parameter_fails_the_flow(prefect_harness, captures, tmp_path):
    """Hole 3: the rotate options used to drop unknown keys (`pca_dims` solved without PCA)."""
    from lib.core.errors import BadInputError

    s, t, _, _ = captures
    with pytest.raises(BadInputError, match=r"rotate_flow options: pca_dims: unknown key \(did you mean 'pca_dim'\?\)"):
        rotate_flow(student_index=str(s), teacher_index=str(t), layers=LAYERS, output_dir=str(tmp_path / "rot"),
                    options={"pca_dims": 4})
    with pytest.raises(BadInputError, match=r"rotate_flow options: pool_scale: 'log' is not one of"):
        rotate_flow(student_index=str(s), teacher_index=str(t), output_dir=str(tmp_path / "rot"),
                    options={"pool_scale": "log"})
    assert not (tmp_path / "rot").exists()
    schema = rotate_flow.parameters.model_dump()
    assert schema["definitions"]["RotateOptions"]["additionalProperties"] is False
    assert "model_config" in schema["definitions"]["RotateOptions"]["properties"]  # as users write it
