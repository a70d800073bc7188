"""Fan-out on the task runner the user picks (issue 12 item 5): threads by default, or Dask
through prefect-dask — an existing scheduler (`--dask-address`) or a LocalCluster started for the
run (`--dask-workers N`). The runner must never change a number: a 2-process LocalCluster gives
the transforms and the metrics ledger rows of the thread runner (the oracle is the thread run of
the same inputs; the scheduler's own task records prove the work ran on the Dask workers), and a
perturbed input must differ (negative control). Bad choices fail before Prefect starts.

Run: `.venv/bin/python -m pytest tests/flows/test_fanout.py -q`
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file
from scipy.stats import ortho_group

from flows.cli import build_parser, main
from flows.runners import on_runner, task_runner
from lib.core.errors import BadInputError
from lib.core.fanout import FanOut, check_dask_reachable, parse_dask_address
from lib.pipeline.config import PipelineConfig
from lib.store.safetensors_io import load_tensors
from lib.testing.synthetic import write_pair_from_arrays
from lib.transport.options import RotateOptions
from lib.transport.record import run_rotation
from tests.e2e.harness import free_port

LAYERS = [f"model.layers.{i}" for i in range(4)]
TEXTS = ["Bondi Beach curves for a kilometre of pale sand.", "The Louvre's glass pyramid glows at dusk.",
         "悉尼歌剧院的白色风帆倒映在港湾里。"]


# --- the choice and its bad inputs (no Prefect run) -------------------------------------------

def test_the_choice_and_its_refusals():
    assert task_runner(FanOut()) is None  # the flow keeps its own thread runner
    assert task_runner(FanOut(), threads=3)._max_workers == 3
    local = task_runner(FanOut(dask_workers=2))
    assert type(local).__name__ == "DaskTaskRunner" and local.cluster_kwargs["n_workers"] == 2
    assert local.cluster_kwargs["host"] == "127.0.0.1" and local.cluster_kwargs["threads_per_worker"] == 1
    assert task_runner(FanOut(dask_address="tcp://10.0.0.5:8786")).address == "tcp://10.0.0.5:8786"
    assert parse_dask_address("10.0.0.5") == ("tcp", "10.0.0.5", 8786)
    with pytest.raises(BadInputError, match=r"dask_address \('tcp://h:1'\) and dask_workers \(2\) were both given.*drop one"):
        FanOut(dask_address="tcp://h:1", dask_workers=2)
    with pytest.raises(BadInputError, match=r"both given"):
        PipelineConfig(teacher="t", student="s", dask_address="tcp://h:1", dask_workers=2)
    with pytest.raises(BadInputError, match=r"'ws://h:1': scheme 'ws' is not one of \['tcp', 'tls'\]; write it as tcp://"):
        FanOut(dask_address="ws://h:1")
    with pytest.raises(BadInputError, match=r"port '0x' is not a number"):
        PipelineConfig(teacher="t", student="s", dask_address="tcp://h:0x")
    with pytest.raises(BadInputError, match=r"dask_workers: must be >= 1"):
        FanOut(dask_workers=0)


def test_reachability_check_names_the_address_reason_and_fix():
    port = free_port()  # bound, then released: nothing listens
    with pytest.raises(BadInputError, match=rf"'tcp://127.0.0.1:{port}': cannot connect to 127.0.0.1:{port} "
                                            r"\(Connection refused\)\. Start the scheduler there \(`dask scheduler"):
        check_dask_reachable(f"tcp://127.0.0.1:{port}")
    with socket.socket() as srv:  # negative control: something listens → no error
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        check_dask_reachable(f"127.0.0.1:{srv.getsockname()[1]}")


def synthetic(tmp_path: Path, perturb: bool = False) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    d, lens = 24, (12, 30, 7, 21, 16)
    r = ortho_group.rvs(d, random_state=1)
    xs = {name: rng.standard_normal((sum(lens), d)) for name in LAYERS}
    ys = {name: xs[name] @ r + 0.3 * rng.standard_normal((sum(lens), d)) for name in LAYERS}
    if perturb:
        xs[LAYERS[2]] = xs[LAYERS[2]].copy()
        xs[LAYERS[2]][5] *= 1.001  # one token of one layer, 0.1 %
    return write_pair_from_arrays(tmp_path / ("perturbed" if perturb else "clean"), xs, ys, lens, rng)


def test_cli_refuses_an_unreachable_scheduler_and_both_choices_before_prefect(tmp_path, capsys):
    s, t = synthetic(tmp_path)
    base = ["rotate", "--student-index", str(s), "--teacher-index", str(t), "--output-dir", str(tmp_path / "rot")]
    port = free_port()  # bound, then released: nothing listens
    for extra, want in ((["--dask-address", f"tcp://127.0.0.1:{port}"], f"cannot connect to 127.0.0.1:{port}"),
                        (["--dask-address", "tcp://127.0.0.1:1", "--dask-workers", "2"], "were both given")):
        with pytest.raises(SystemExit) as ex:
            main([*base, *extra])
        assert ex.value.code == 2
        assert want in capsys.readouterr().err
    assert not (tmp_path / "rot").exists()
    from flows.commands.pipeline import config_from_args

    args = build_parser().parse_args(["pipeline", "--teacher", "t", "--student", "s", "--dask-workers", "3"])
    assert config_from_args(args).fanout == FanOut(dask_workers=3)  # the pipeline flag comes from the config model


# --- the same numbers on a 2-process LocalCluster ---------------------------------------------

def qa_setup(make_tiny, tmp_path: Path) -> Path:
    from flows.scaffold import scaffold_flow

    teacher, student = make_tiny("llama"), make_tiny("llama", seed=1)
    save_file({"rotation": ortho_group.rvs(128, random_state=3)}, str(tmp_path / "q.safetensors"))
    samples, prompts = tmp_path / "samples", tmp_path / "prompts"
    samples.mkdir()
    prompts.mkdir()
    (samples / "stops.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    (prompts / "system.md").write_text("You are a tour guide.\n")
    scaffold_flow(run_id="fan", runs_root=str(tmp_path / "runs"), samples_dir=str(samples), prompts_dir=str(prompts))
    config = {"run_id": "fan", "runs_root": str(tmp_path / "runs"), "teacher": {"path": str(teacher)},
              "variants": [{"name": "student", "path": str(student)},
                           {"name": "student-q", "path": str(student),
                            "transports": [{"kind": "rotation", "path": str(tmp_path / "q.safetensors")}]}],
              "device": "cpu", "batch_size": 2}
    (tmp_path / "eval.json").write_text(json.dumps(config))
    return tmp_path / "eval.json"


def rotation_files(summary: dict) -> dict[str, dict[str, np.ndarray]]:
    paths = {r["layer"]: r["rotation_path"] for r in summary["layers"]}
    paths.update({f"stats/{r['layer']}": r["stats_path"] for r in summary["layers"]})
    paths["global"] = summary["global"]["rotation_path"]
    return {k: load_tensors(p)[0] for k, p in paths.items()}


def numbers(summary: dict) -> tuple[list, np.ndarray]:
    """The per-layer figures of a rotate summary (without paths and timings): (the layer names
    and kinds, every number in order)."""
    drop = {"seconds", "rotation_path", "stats_path"}
    labels, values = [], []
    for r in summary["layers"]:
        for k, v in sorted(r.items()):
            if k in drop:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) or isinstance(v, list):
                labels.append(k)
                values.extend(np.atleast_1d(np.asarray(v, float)))
            else:
                labels.append((k, v))
    return labels, np.array(values)


def max_diff(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]]) -> float:
    assert a.keys() == b.keys() and all(a[k].keys() == b[k].keys() for k in a)
    return max(float(np.max(np.abs(a[k][n] - b[k][n]))) for k in a for n in a[k])


@pytest.mark.slow
def test_local_cluster_gives_the_thread_runner_numbers(prefect_harness, make_tiny, tmp_path):
    from distributed import Client, LocalCluster

    from flows.qa import qa_flow
    from flows.rotate import rotate_flow

    s, t = synthetic(tmp_path)
    kw = dict(student_index=str(s), teacher_index=str(t), layers=LAYERS, options={"full_moments": True}, run_id="fan")
    threads = on_runner(rotate_flow, FanOut(), threads=2)(output_dir=str(tmp_path / "rot-threads"), **kw)
    eval_path = qa_setup(make_tiny, tmp_path)
    qa_threads = on_runner(qa_flow, FanOut())(config=str(eval_path), night="threads", report=False)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      scheduler_kwargs={"dashboard": False}) as cluster, Client(cluster) as client:
        dask = FanOut(dask_address=cluster.scheduler_address)
        check_dask_reachable(cluster.scheduler_address)
        on_dask = on_runner(rotate_flow, dask)(output_dir=str(tmp_path / "rot-dask"), **kw)
        qa_dask = on_runner(qa_flow, dask)(config=str(eval_path), night="dask", report=False)
        # the scheduler's record: each layer solve and each variant's metrics ran on a worker process
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert {"solve_layer_task", "record_metrics_task"} <= set(prefixes), prefixes
    # 4 layer solves + 3 metrics tasks (teacher, 2 variants), and both worker processes took some
    assert len(executed) == 2 and all(n > 0 for n in executed.values()) and sum(executed.values()) >= 7, executed

    # rotate: every rotation, moment and figure as the thread runner has them (≤ 1e-12)
    a, b = rotation_files(threads), rotation_files(on_dask)
    print(f"fan-out: rotate max |threads - dask| = {max_diff(a, b):.3g}")
    assert max_diff(a, b) <= 1e-12
    (la, na), (lb, nb) = numbers(threads), numbers(on_dask)
    assert la == lb and na.size > 40 and np.max(np.abs(na - nb)) <= 1e-12
    assert [r["layer"] for r in on_dask["layers"]] == LAYERS  # combined in layer order
    # negative control: 0.1 % on one token of layer 2 moves that layer and the pooled rotation
    # (solved in-process: it shows the comparison above would see such a difference)
    ps, pt = synthetic(tmp_path, perturb=True)
    c = rotation_files(run_rotation(ps, pt, LAYERS, tmp_path / "rot-perturbed", options=RotateOptions(full_moments=True)))
    assert float(np.max(np.abs(c[LAYERS[2]]["rotation"] - a[LAYERS[2]]["rotation"]))) > 1e-9
    assert float(np.max(np.abs(c["global"]["rotation"] - a["global"]["rotation"]))) > 1e-9
    assert float(np.max(np.abs(c[LAYERS[0]]["rotation"] - a[LAYERS[0]]["rotation"]))) <= 1e-12

    # QA: the same ledger rows for both nights, row for row (≤ 1e-12), in config order
    assert [r["variant"] for r in qa_dask["results"]] == ["teacher", "student", "student-q"] == \
        [r["variant"] for r in qa_threads["results"]]
    df = pq.read_table(tmp_path / "runs" / "fan" / "ledgers" / "metrics").to_pandas()
    key = ["variant", "metric", "layer", "sample"]
    rows = {night: df[df.night == night].sort_values(key, na_position="first").reset_index(drop=True)
            for night in ("threads", "dask")}
    assert len(rows["threads"]) == len(rows["dask"]) > 30
    assert rows["threads"][key].fillna("-").equals(rows["dask"][key].fillna("-"))
    va, vb = rows["threads"].value.to_numpy(float), rows["dask"].value.to_numpy(float)
    print(f"fan-out: QA ledger max |threads - dask| = {np.nanmax(np.abs(va - vb)):.3g} over {len(va)} rows")
    assert np.array_equal(np.isnan(va), np.isnan(vb)) and np.nanmax(np.abs(va - vb)) <= 1e-12
    # …and the rows are not trivially equal: the rotation transport changes the student's cosines
    cos = rows["dask"][(rows["dask"].metric == "hidden_state_cosine") & rows["dask"]["sample"].isna()]
    assert not np.allclose(cos[cos.variant == "student"].value.to_numpy(float),
                           cos[cos.variant == "student-q"].value.to_numpy(float))
