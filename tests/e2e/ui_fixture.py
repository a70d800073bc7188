"""Make the artifacts the UI check looks at, on the server in PREFECT_API_URL: a scaffolded run
with a wide QA history (8 variants × 24 layers, two nights, a rotations ledger, the checkpoints
of the latest night), then the real report flow. Prints JSON: the report flow run's id and name
and {key: artifact id} of its artifacts (the latest version of each key).

    PREFECT_API_URL=http://127.0.0.1:4200/api python tests/e2e/ui_fixture.py RUNS_ROOT [RUN_ID]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VARIANTS = ["teacher"] + [f"student-{k}" for k in ("baseline", "rotated", "folded", "pruned-10", "pruned-20",
                                                    "merged-a", "merged-b")]
LAYERS = [f"model.layers.{i}" for i in range(24)]


def night_rows(run_id: str, night: str, stamp: str, digest: str, shift: float) -> list[dict]:
    common = dict(run_id=run_id, night=night, timestamp=stamp, snapshot_digest=digest, code_version="ui-check")
    rows = []
    for j, v in enumerate(VARIANTS):
        base = 0.0 if v == "teacher" else 0.01 * j + shift
        rows += [dict(common, variant=v, metric="surprisal", value=3.5 + base, n_tokens=9000),
                 dict(common, variant=v, metric="perplexity", value=math.exp(3.5 + base), n_tokens=9000)]
        if v != "teacher":
            rows.append(dict(common, variant=v, metric="logit_kl", value=base, n_tokens=9000))
        for i, la in enumerate(LAYERS):
            rms = (1.0 + 0.2 * i) * (1 + base)
            rows.append(dict(common, variant=v, metric="residual_rms", layer=la, value=rms, n_tokens=9000))
            if v != "teacher":
                rows += [dict(common, variant=v, metric="hidden_state_cosine", layer=la,
                              value=1.0 - base * (1 + i / 24), n_tokens=9000),
                         dict(common, variant=v, metric="residual_rms_ratio", layer=la, value=1 + base, n_tokens=9000)]
    return rows


def rotation_rows(run_id: str) -> list[dict]:
    return [dict(run_id=f"{run_id}-rotate", recorded_at="2026-01-15T01:00:00+00:00", layer=la, kind="procrustes",
                 n_tokens=12788, d_student=896, d_teacher=896, pca_dim=None, cosine_before=0.04 + 0.01 * i,
                 cosine_after=0.999, cosine_global=0.998, fit_residual=0.01, dist_to_global=0.02,
                 excluded_position0=False, top_singular_values="[1.0, 0.9]", rotation_path=f"rotations/{la}.safetensors",
                 student_index="activations/transport-student/metadata.jsonl",
                 teacher_index="activations/transport-teacher/metadata.jsonl") for i, la in enumerate(LAYERS)]


def make_run(runs_root: Path, run_id: str) -> Path:
    from lib.store.ledgers import append_rows, ledger_path
    from lib.store.runs import ScaffoldSpec, scaffold_run

    man = scaffold_run(ScaffoldSpec(run_id=run_id, runs_root=str(runs_root)))
    run_dir = Path(man["run_dir"])
    digest = man["snapshot_digest"]
    for k, night in enumerate(("2026-01-14", "2026-01-15")):
        append_rows(ledger_path(run_dir, "metrics"), "metrics",
                    night_rows(run_id, night, f"{night}T02:00:{k:02d}+00:00", digest, 0.002 * k))
    append_rows(ledger_path(run_dir, "rotations"), "rotations", rotation_rows(run_id))
    models = {"night": "2026-01-15",
              "teacher": {"name": "teacher", "path": "Qwen/Qwen3-0.6B", "ref": "Qwen/Qwen3-0.6B",
                          "revision": "c1899de289a04d12100db370d81485cdf75e47ca",
                          "tokenizer": {"name": "Qwen/Qwen3-0.6B", "version": "c1899de289a04d12100db370d81485cdf75e47ca",
                                        "class": "Qwen2Tokenizer"}},
              "variants": [{"name": v, "path": f"{runs_root}/{run_id}/checkpoints/{v}", "ref": v,
                            "revision": f"sha256:{i:02d}" + "0123456789abcdef" * 2, "tokenizer": None}
                           for i, v in enumerate(VARIANTS[1:])]}
    (run_dir / "qa_models.json").write_text(json.dumps(models, indent=2))
    return run_dir


def control_markdown() -> str:
    """The negative control: what the check must flag — an image that cannot load (a corrupt
    PNG data URI), a 16-column table, a long unbreakable hash in a narrow table."""
    wide = ("| " + " | ".join(f"layer_{i:02d}_metric" for i in range(16)) + " |\n|" + "---|" * 16 + "\n| "
            + " | ".join("0.123456" for _ in range(16)) + " |")
    return (f"# Control\n\n![broken](data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB)\n\n{wide}\n\n"
            f"| model | revision | note |\n|---|---|---|\n| teacher | {'0123456789abcdef' * 6} | x |\n")


def main(argv: list[str]) -> None:
    runs_root = Path(argv[0]).resolve()
    run_id = argv[1] if len(argv) > 1 else "ui-check"
    make_run(runs_root, run_id)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.report import report_flow

    state = report_flow(run_id=run_id, runs_root=str(runs_root), return_state=True)
    from prefect.artifacts import create_markdown_artifact

    from lib.transport.record import format_rotation_table
    from tasks.names import path_key
    from tasks.rotate import rotation_markdown

    merged = [dict(r, cosine_after=0.999, fit_residual=0.01, fit_residual_global=0.02, top_singular_values=[812.5],
                   permutations={"heads_mean_similarity": 0.98, "mlp_mean_correlation": 0.97})
              for r in rotation_rows(run_id)]
    rotations = create_markdown_artifact(
        markdown=rotation_markdown({"run_id": f"{run_id}-rotate", "layers": merged,
                                    "table": format_rotation_table(merged) + "\n12788 paired tokens from 200 sample(s)"}),
        key=path_key("rotations", str(runs_root / run_id / "rotations")), description="the rotate flow's table")
    control = create_markdown_artifact(markdown=control_markdown(), key="ui-check-control",
                                       description="negative control of the UI check: must be flagged")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    print(json.dumps({"flow_run_id": str(run.id), "flow_run_name": run.name, "state": state.type.value,
                      "artifacts": {a.key: str(a.id) for a in arts if a.key}, "control": str(control),
                      "rotations": str(rotations)}))


if __name__ == "__main__":
    main(sys.argv[1:])
