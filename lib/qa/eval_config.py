"""The QA eval config: which checkpoints to compare with the teacher, and how, as frozen dataclasses.

One schema, two syntaxes: JSON (`deployments/eval_template.json`) or TOML (Python's `tomllib`)::

    run_id = "nightly"                 # a run scaffolded under runs_root (`tourguide scaffold`)
    runs_root = "runs"
    metrics = ["logit_kl", "hidden_state_cosine", "residual_rms", "surprisal"]
    dtype = "float32"                  # capture dtype; compute_dtype, device, max_length, batch_size, layers, limit
    [teacher]
    path = "Qwen/Qwen3-0.6B"           # local model folder or a hub id already in the HF cache
    [[variants]]
    name = "student-rotated"
    path = "runs/nightly/checkpoints/student"
    [[variants.transports]]            # applied in order to the variant's residual before comparing
    kind = "rotation"                  # rotation | pca_adapter | permutation
    path = "runs/nightly/rotations/global.safetensors"

Relative paths are taken from the working directory (the checkout root for deployments).
`load_eval_config(path)` raises BadInputError naming the file and the key path
(`variants[1].transports[0].path`) for unknown keys, wrong types, bad values and missing paths.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from lib.core.errors import BadInputError

METRICS = ("logit_kl", "hidden_state_cosine", "residual_rms", "surprisal")


TRANSPORT_KINDS = ("rotation", "pca_adapter", "permutation")


DTYPES = ("float32", "float16", "bfloat16")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class TransportConfig:
    """A map from the variant's residual basis to the teacher's, applied before comparing.

    rotation: safetensors tensor "rotation" [d_s, d_t] (x ↦ x @ Q, the solver's convention);
    pca_adapter: "projection" [d_s, d_t] or "student_basis" [d_s, k] + "teacher_basis" [d_t, k]
    (+ "k_rotation" [k, k], "student_mean", "teacher_mean"); permutation: "permutation" int64 [d]
    (x ↦ x[:, perm])."""

    kind: str
    path: str


@dataclass(frozen=True)
class TeacherConfig:
    path: str
    name: str = "teacher"
    revision: str | None = None


@dataclass(frozen=True)
class VariantConfig:
    name: str
    path: str
    revision: str | None = None
    transports: tuple[TransportConfig, ...] = ()


@dataclass(frozen=True)
class EvalConfig:
    run_id: str
    teacher: TeacherConfig
    variants: tuple[VariantConfig, ...]
    runs_root: str = "runs"
    metrics: tuple[str, ...] = METRICS
    dtype: str = "float32"
    compute_dtype: str | None = None
    device: str = "auto"
    max_length: int | None = None
    batch_size: int = 8
    layers: tuple[str, ...] = ()  # capture hook points; () = every decoder block
    limit: int | None = None  # first N blurbs of the snapshot only (smoke runs)
    hf_home: str | None = None
    hf_hub_cache: str | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (lists for tuples); `config_from_dict(cfg.to_dict()) == cfg`."""
        return json.loads(json.dumps(asdict(self)))

    def variant(self, name: str) -> VariantConfig:
        for v in self.variants:
            if v.name == name:
                return v
        raise BadInputError(f"no variant named {name!r}; the config has {[v.name for v in self.variants]}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if is_dataclass(tp):
        return "table/object"
    return {str: "string", int: "integer", bool: "boolean"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, key, source)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise BadInputError(f"{source}: {key}: must be a {_type_name(tp)}, got {value!r:.60}")
        return tuple(_convert(typing.get_args(tp)[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if is_dataclass(tp):
        return _parse(tp, value, key, source)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise BadInputError(f"{source}: {key}: must be a {_type_name(tp)}, got {value!r:.60}")
    return value


def _parse(cls: type, data: Any, key: str, source: str) -> Any:
    where = key or "top level"
    if not isinstance(data, Mapping):
        raise BadInputError(f"{source}: {where}: must be a table/object, got {data!r:.60}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise BadInputError(f"{source}: {_join(key, unknown[0])}: unknown key; {where} accepts {sorted(known)}")
    kwargs = {}
    for name, f in known.items():
        sub = _join(key, name)
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
                raise BadInputError(f"{source}: {sub}: required key is missing")
            continue
        kwargs[name] = _convert(hints[name], data[name], sub, source)
    return cls(**kwargs)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def config_from_dict(data: Mapping[str, Any], source: str = "<eval config>", check_paths: bool = False) -> EvalConfig:
    """Parse and check a config mapping (as read from JSON or TOML)."""
    cfg = _parse(EvalConfig, data, "", source)
    check_values(cfg, source)
    if check_paths:
        check_config_paths(cfg, source)
    return cfg


def load_eval_config(path: str | os.PathLike, check_paths: bool = True) -> EvalConfig:
    """Read a `.json` or `.toml` eval config; with `check_paths`, every model and transport path
    must exist (hub ids must be in the HF cache)."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"eval config {p}: file not found; start from deployments/eval_template.json")
    text = p.read_bytes().decode("utf-8", errors="replace")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{p}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise BadInputError(f"{p}: not valid JSON (nested too deeply)") from None
    elif p.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise BadInputError(f"{p}: not valid TOML ({exc})") from None
        except RecursionError:
            raise BadInputError(f"{p}: not valid TOML (nested too deeply)") from None
    else:
        raise BadInputError(f"eval config {p}: unknown suffix {p.suffix!r}; use .json or .toml")
    return config_from_dict(data, str(p), check_paths)


def check_values(cfg: EvalConfig, source: str) -> None:
    from lib.store.runs import check_run_id

    check_run_id(cfg.run_id, key=f"{source}: run_id")
    if not cfg.variants:
        raise BadInputError(f"{source}: variants: list at least one checkpoint variant to compare with the teacher")
    names = [cfg.teacher.name] + [v.name for v in cfg.variants]
    keys = ["teacher.name"] + [f"variants[{i}].name" for i in range(len(cfg.variants))]
    for idx, (key, name) in enumerate(zip(keys, names, strict=True)):
        if not _NAME.match(name):
            raise BadInputError(f"{source}: {key}: {name!r} must be 1-64 letters, digits, '.', '_' or '-' (it names a "
                                "folder and a ledger value)")
        if name in names[:idx]:
            raise BadInputError(f"{source}: {key}: name {name!r} is used twice (teacher and variant names must be unique)")
    for i, v in enumerate(cfg.variants):
        for j, t in enumerate(v.transports):
            if t.kind not in TRANSPORT_KINDS:
                raise BadInputError(f"{source}: variants[{i}].transports[{j}].kind: {t.kind!r} is not one of "
                                    f"{list(TRANSPORT_KINDS)}")
    if not cfg.metrics:
        raise BadInputError(f"{source}: metrics: turn at least one of {list(METRICS)} on")
    for i, m in enumerate(cfg.metrics):
        if m not in METRICS:
            raise BadInputError(f"{source}: metrics[{i}]: unknown metric {m!r}; known: {list(METRICS)}")
        if cfg.metrics.count(m) > 1:
            raise BadInputError(f"{source}: metrics[{i}]: {m!r} is listed twice")
    from lib.qa.metric_names import is_residual_layer

    if cfg.layers and not any(is_residual_layer(x) for x in cfg.layers) and \
            set(cfg.metrics) & {"hidden_state_cosine", "residual_rms"}:
        raise BadInputError(f"{source}: layers: none of {list(cfg.layers)} is a decoder block output (model.layers.N); "
                            "hidden_state_cosine and residual_rms need at least one (or leave `layers` empty: every block)")
    for key in ("dtype", "compute_dtype"):
        val = getattr(cfg, key)
        if val is not None and val not in DTYPES:
            raise BadInputError(f"{source}: {key}: {val!r} is not one of {list(DTYPES)}")
    for key, low in (("batch_size", 1), ("max_length", 1), ("limit", 1)):
        val = getattr(cfg, key)
        if val is not None and val < low:
            raise BadInputError(f"{source}: {key}: must be >= {low}, got {val}")


def _probe(test: Any) -> bool:
    """test() of a path from the config, False when the path is unusable (over-long name, NUL,
    '~nosuchuser'): pathlib raises for those instead of answering."""
    try:
        return bool(test())
    except (OSError, RuntimeError, ValueError):
        return False


def check_config_paths(cfg: EvalConfig, source: str) -> None:
    """Every model folder / cached hub id and every transport file must exist."""
    for key in ("hf_home", "hf_hub_cache"):
        val = getattr(cfg, key)
        if val is not None and not _probe(lambda: Path(val).is_dir()):
            raise BadInputError(f"{source}: {key}: folder {val} not found")
    models = [("teacher.path", cfg.teacher.path, cfg.teacher.revision)]
    models += [(f"variants[{i}].path", v.path, v.revision) for i, v in enumerate(cfg.variants)]
    for key, ref, revision in models:
        _check_model(cfg, source, key, ref, revision)
    for i, v in enumerate(cfg.variants):
        for j, t in enumerate(v.transports):
            if not _probe(lambda: Path(t.path).is_file()):
                raise BadInputError(f"{source}: variants[{i}].transports[{j}].path: {t.kind} file {t.path} not found "
                                    "(relative paths are taken from the working directory); run `tourguide rotate` "
                                    "first or fix the path")


def _check_model(cfg: EvalConfig, source: str, key: str, ref: str, revision: str | None) -> None:
    from lib.models.loading import looks_like_path, resolve_model

    if _probe(lambda: Path(ref).expanduser().exists()) or looks_like_path(ref):
        if not _probe(lambda: (Path(ref).expanduser() / "config.json").is_file()):
            raise BadInputError(f"{source}: {key}: model folder {ref} not found or has no config.json "
                                "(relative paths are taken from the working directory); fix the path")
        return
    try:  # a hub id: cheap to resolve (no hashing), and fails clearly when not cached
        resolve_model(ref, revision, cfg.hf_home, cfg.hf_hub_cache)
    except BadInputError as exc:
        raise BadInputError(f"{source}: {key}: {exc}") from None
