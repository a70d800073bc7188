"""Append-only ledgers: parquet (one file per append, a declared pyarrow schema) or JSON lines.

`append_rows(path, name, rows)` picks the backend from the path: '*.jsonl' -> one JSON object
per line (durable append); anything else ('*.parquet' or a folder) -> a folder of parquet files,
one per append, named so that concurrent writers never collide. `read_ledger` reads either back
as a pandas DataFrame (a parquet folder reads as one dataset, also with duckdb/pyarrow).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from lib.core.digests import sha256_json
from lib.core.errors import BadInputError
from lib.store.atomic import append_lines_durable, locked, write_atomic

_f64, _i64, _str, _bool = pa.float64(), pa.int64(), pa.string(), pa.bool_()


SCHEMAS: dict[str, pa.Schema] = {
    "dataset": pa.schema([("run_id", _str), ("file", _str), ("kind", _str), ("line", _i64),
                          ("sha256", _str), ("recorded_at", _str)]),
    "shards": pa.schema([("run_id", _str), ("index", _str), ("shard", _str), ("sample_id", _str),
                         ("sha256", _str), ("bytes", _i64), ("ok", _bool), ("checked_at", _str)]),
    "rotations": pa.schema([
        ("run_id", _str), ("recorded_at", _str), ("layer", _str), ("kind", _str), ("n_tokens", _i64),
        ("d_student", _i64), ("d_teacher", _i64), ("pca_dim", _i64), ("cosine_before", _f64),
        ("cosine_after", _f64), ("cosine_global", _f64), ("fit_residual", _f64), ("dist_to_global", _f64),
        ("excluded_position0", _bool), ("top_singular_values", _str), ("rotation_path", _str),
        ("student_index", _str), ("teacher_index", _str),
    ]),
    "metrics": pa.schema([
        ("run_id", _str), ("night", _str), ("timestamp", _str), ("variant", _str), ("metric", _str),
        ("layer", _str), ("value", _f64), ("n_tokens", _i64), ("snapshot_digest", _str), ("code_version", _str),
        ("sample", _str),  # per-sample rows (logit_kl, surprisal); null for whole-snapshot means
    ]),
    "fold": pa.schema([
        ("run_id", _str), ("recorded_at", _str), ("checkpoint", _str), ("output_dir", _str), ("exact", _bool),
        ("passed", _bool), ("max_abs_logit_diff", _f64), ("mean_kl", _f64), ("top1_agreement", _f64),
        ("hidden_cosine_min", _f64), ("spec", _str),
        ("status", _str), ("dtype", _str), ("n_probe_tokens", _i64),
    ]),
}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _coerce(rows: Sequence[dict[str, Any]], schema: pa.Schema, name: str) -> pa.Table:
    cols = {f.name for f in schema}
    for i, r in enumerate(rows):
        extra = set(r) - cols
        if extra:
            raise BadInputError(f"ledger {name!r} row {i}: unknown column(s) {sorted(extra)}; declared: {sorted(cols)}")
    try:
        return pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise BadInputError(f"ledger {name!r}: a row does not fit the declared schema ({exc})") from None


# When a row was written, not what it says: left out of an append's identity (see append_key).
VOLATILE_COLUMNS = ("recorded_at", "checked_at")
APPEND_FIELD = "_append"  # JSONL rows carry their append's key here (ignored when read back)


def append_key(rows: Sequence[dict[str, Any]]) -> str:
    """The identity of an append: a digest of its rows without their write timestamps. A retried
    task (or a re-run that found the same facts) produces the same key."""
    return sha256_json([{k: v for k, v in r.items() if k not in VOLATILE_COLUMNS} for r in rows])[:32]


def append_rows(path: str | os.PathLike, name: str, rows: Sequence[dict[str, Any]], *, key: str | None = None) -> Path:
    """Append `rows` to ledger `name` at `path` (never rewriting earlier rows). Returns the file
    holding them.

    Idempotent: an append is identified by `key` (default `append_key(rows)`), and an append whose
    key is already in the ledger writes nothing. Retried tasks append after their work and may
    fail after the append (a lost connection, a later step): without this, every retry would add
    the rows again."""
    if name not in SCHEMAS:
        raise BadInputError(f"unknown ledger {name!r}; known: {sorted(SCHEMAS)}")
    path = Path(path)
    schema = SCHEMAS[name]
    table = _coerce(rows, schema, name)  # validate before anything is written
    key = key or append_key(rows)
    if path.suffix == ".jsonl":
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.parent / f".{path.name}.lock"):
            if path.exists() and any(r.get(APPEND_FIELD) == key for r in _jsonl_rows(path, name)):
                return path
            # One write for the whole append: concurrent appenders never interleave their rows.
            append_lines_durable(path, [json.dumps({**r, APPEND_FIELD: key}, sort_keys=True, ensure_ascii=False)
                                        for r in table.to_pylist()])
        return path
    folder = path
    folder.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    with locked(folder / ".append.lock"):
        done = sorted(folder.glob(f"part-*-{key}.parquet"))
        if done:
            return done[0]
        # The time stamp first keeps file names in write order; the key last makes the append findable.
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        target = folder / f"part-{stamp}-{key}.parquet"
        write_atomic(target, lambda tmp: pq.write_table(table, tmp))
    return target


def _jsonl_rows(path: Path, name: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise BadInputError(f"{path}:{lineno}: malformed JSON line in ledger {name!r}; fix or delete that line")
            rows.append(row)
    return rows


def read_ledger(path: str | os.PathLike, name: str):
    """The whole ledger as a DataFrame with the declared columns (empty if nothing yet)."""
    import pandas as pd

    path = Path(path)
    schema = SCHEMAS[name]
    if path.suffix == ".jsonl":
        if not path.exists():
            return schema.empty_table().to_pandas()
        rows = [{k: v for k, v in r.items() if k != APPEND_FIELD} for r in _jsonl_rows(path, name)]
        return _coerce(rows, schema, name).to_pandas() if rows else schema.empty_table().to_pandas()
    files = sorted(path.glob("part-*.parquet")) if path.is_dir() else []
    if not files:
        return schema.empty_table().to_pandas()
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f, schema=schema) for f in files]).to_pandas() if files else pd.DataFrame()


def ledger_path(run_dir: str | os.PathLike, name: str) -> Path:
    """Where ledger `name` lives inside a run: runs/<id>/ledgers/<name>/."""
    return Path(run_dir) / "ledgers" / name
