"""What `tourguide pipeline` checks before Prefect starts: the models resolve (local folders or
cached hub ids), their families are supported, the layers exist on both sides, the widths agree
(or `pca_dim` bridges them), permutations are solvable, the run folder and the fold output are
usable, the corpus a scaffolded run was made from is unchanged, and the run id holds no record
of another config, and a `dask_address` answers. Reads config.json files and the corpus only: no
weights, no forward pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lib.core.errors import BadInputError
from lib.pipeline.config import PipelineConfig
from lib.pipeline.run_record import check_run_record
from lib.pipeline.steps import FOLDED_NAME, plan_hooks


def _writable(path: Path, what: str) -> None:
    """`path` (or, when absent, its nearest existing parent) is a folder we may write in."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise BadInputError(f"{what} {path}: {p} is a file, not a folder; pick another --runs-root / --run-id")
    if p.exists() and not os.access(p, os.W_OK | os.X_OK):
        raise BadInputError(f"{what} {path}: {p} is not writable; make it writable or pick another --runs-root")


def check_pair(teacher_cfg: dict[str, Any], student_cfg: dict[str, Any], cfg: PipelineConfig,
               blocks: list[str]) -> dict[str, int]:
    """The teacher has every block aligned, the widths agree (or pca_dim bridges them) and,
    when permutations are solved, heads and MLP widths match. Returns the widths."""
    from lib.models.adapters import adapter_for_config

    t, s = adapter_for_config(teacher_cfg), adapter_for_config(student_cfg)
    missing = [b for b in blocks if t.block_index(b) is None]
    if missing:
        raise BadInputError(f"the teacher has {t.num_layers} decoder blocks, so it has no {missing}; the transports "
                            "pair blocks by name: pass --layers with blocks both models have")
    d_s, d_t = s.hidden_size, t.hidden_size
    if cfg.pca_dim is None and d_s != d_t:
        raise BadInputError(f"the student's hidden size is {d_s} and the teacher's {d_t}: pass --pca-dim K "
                            f"(K ≤ {min(d_s, d_t)}) to align them in a shared K-dimensional PCA space (then nothing "
                            "is folded; QA compares through the PCA map)")
    if cfg.pca_dim is not None and cfg.pca_dim > min(d_s, d_t):
        raise BadInputError(f"--pca-dim {cfg.pca_dim} is larger than the smaller width {min(d_s, d_t)} (student {d_s}, "
                            f"teacher {d_t}); pass --pca-dim ≤ {min(d_s, d_t)}")
    if cfg.permutations:
        shape = {"query heads": (s.num_heads, t.num_heads), "kv heads": (s.num_kv_heads, t.num_kv_heads),
                 "head_dim": (s.head_dim, t.head_dim), "intermediate_size": (s.intermediate_size, t.intermediate_size)}
        differ = {k: v for k, v in shape.items() if v[0] != v[1]}
        if differ:
            shown = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items())
            raise BadInputError(f"permutations match heads and MLP neurons one to one, but student and teacher differ "
                                f"({shown}); pass --no-solve-permutations")
    return {"d_student": d_s, "d_teacher": d_t}


def preflight(cfg: PipelineConfig) -> dict[str, Any]:
    """Check `cfg` (see the module doc). Returns what was resolved: {"run_dir", "teacher",
    "student" ({ref, local_dir, revision}), "blocks", "hooks", "d_student", "d_teacher",
    "fold" (False with pca_dim), "identity", "recorded" (a record for this run id exists)}.
    Raises BadInputError / ModelLoadError naming the input and the fix; writes nothing."""
    from lib.models.loading import read_config, resolve_model
    from lib.pipeline.run_record import RECORD_NAME
    from lib.store.runs import MANIFEST_NAME, verify_snapshot
    from lib.store.staging import check_output_dir

    run_dir = cfg.run_dir()
    _writable(Path(cfg.runs_root), "--runs-root")
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInputError(f"run folder {run_dir} is a file; pick another --run-id")
    _writable(run_dir, "run folder")
    refs = {side: resolve_model(getattr(cfg, side), hf_home=cfg.hf_home, hf_hub_cache=cfg.hf_hub_cache)
            for side in ("teacher", "student")}
    configs = {side: read_config(ref) for side, ref in refs.items()}
    plan = plan_hooks(cfg)
    widths = check_pair(configs["teacher"], configs["student"], cfg, plan["blocks"])
    fold = cfg.pca_dim is None
    if fold:
        check_output_dir(run_dir / "checkpoints" / FOLDED_NAME, source=refs["student"].local_dir)
    if (run_dir / MANIFEST_NAME).exists():
        verify_snapshot(cfg.runs_root, cfg.run_id)
    identity = check_run_record(cfg)
    if cfg.dask_address is not None:  # a scheduler that is not there fails now, not inside the rotate step
        from lib.core.fanout import check_dask_reachable

        check_dask_reachable(cfg.dask_address)
    return {"run_dir": str(run_dir), "blocks": plan["blocks"], "hooks": plan["hooks"], "fold": fold,
            **{side: {"ref": r.ref, "local_dir": r.local_dir, "revision": r.revision} for side, r in refs.items()},
            **widths, "identity": identity, "recorded": (run_dir / RECORD_NAME).exists()}
