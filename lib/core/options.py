"""Typed options and configs: the one base every options, config and result object uses.

`Model` is a pydantic model that refuses unknown keys (`extra="forbid"`), and whose every
validation failure — keyword construction, `model_validate`, `parse` — is a `BadInputError`
quoting the key path the way users write it::

    eval.toml: variants[1].transports[0].path: required key is missing
    fold options: overwrit: unknown key (did you mean 'overwrite'?); top level accepts [...]
    eval.json: batch_size: must be an integer, got 'eight'

`Frozen` is a `Model` that is a value (immutable, hashable when its fields are). `Options` is a
`Frozen` for what users write (CLI flags, deployment parameters, config files): its scalars are
strict (no `true` for an integer, no `"8"` for 8), while `Seq[...]` fields take a JSON/TOML list
and hold a tuple. Field descriptions matter: Prefect renders these models as forms in its UI.

`read_config_file` reads a `.json` or `.toml` file (errors name file:line:col); `Model.from_file`
reads and validates one. Only pydantic is imported here: parsing bad input must stay light (the
CLI refuses it before Prefect is ever imported).
"""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError

from lib.core.errors import BadInputError

T = TypeVar("T")

# A list in JSON/TOML (and in the UI form), a tuple in Python: values stay hashable. The container
# is lax (list or tuple); its items keep the model's strictness.
Seq = Annotated[tuple[T, ...], Strict(False)]


def _fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# A path held as a string (JSON-able); Python callers may pass a pathlib.Path.
PathStr = Annotated[str, BeforeValidator(_fspath)]


def one_of(choices: Sequence[str]) -> Any:
    """A string that must be one of `choices` (an enum in the JSON schema: a dropdown in the UI)."""
    allowed = list(choices)

    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {allowed}")
        return value

    return Annotated[str, AfterValidator(check), Field(json_schema_extra={"enum": allowed})]


class Model(BaseModel):
    """Base of every options/config/result object: unknown keys refused, errors as BadInputError.

    `label` names the object in messages when no file or parameter is the source
    ("fold options: …")."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants", validate_default=False)

    label: ClassVar[str] = ""
    root: ClassVar[str] = "top level"  # how messages name the object itself (a problem at no key)
    hint: ClassVar[str] = ""  # the fix, appended to every validation message

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise BadInputError(describe(type(self), exc)) from None

    # pydantic then treats this __init__ as its own (no custom-init path for nested models)
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise BadInputError(describe(cls, exc)) from None

    @classmethod
    def parse(cls, data: Any, source: str | None = None) -> Any:
        """`data` (a mapping, or already an instance) as this model; BadInputError naming
        `source` (a file, a parameter) and the key path otherwise."""
        if isinstance(data, cls):
            return data
        try:
            return BaseModel.model_validate.__func__(cls, data)  # type: ignore[attr-defined]
        except ValidationError as exc:
            raise BadInputError(describe(cls, exc, source)) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, hint: str = "") -> Any:
        """Read a `.json` / `.toml` file (`read_config_file`) and validate it; errors name the file."""
        return cls.parse(read_config_file(path, cls.label or "config", hint), str(path))


class Frozen(Model):
    """A `Model` that is a value: immutable (and hashable when its fields are)."""

    model_config = ConfigDict(frozen=True)


class Options(Frozen):
    """What users write (flags, deployment parameters, config files): strict scalars."""

    model_config = ConfigDict(strict=True)


# --- error messages ------------------------------------------------------------------------------

_KINDS = {
    "int": "an integer", "float": "a number", "bool": "a boolean (true/false)", "string": "a string",
    "list": "a list", "tuple": "a list", "set": "a list", "iterable": "a list", "dict": "a table/object",
    "model": "a table/object", "model_attributes": "a table/object", "dataclass": "a table/object",
}


def key_path(loc: Sequence[Any]) -> str:
    """('variants', 1, 'transports', 0, 'path') -> 'variants[1].transports[0].path'."""
    out = ""
    for item in loc:
        out += f"[{item}]" if isinstance(item, int) else (f".{item}" if out else str(item))
    return out


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def model_at(cls: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class found at `loc` inside `cls` (through optionals, tuples, lists, dicts)."""
    tp: Any = cls
    for item in loc:
        tp = _unwrap(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(item) if isinstance(item, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif origin in (tuple, list) and isinstance(item, int) and args:
            tp = args[0] if origin is list or args[-1] is Ellipsis else (args[item] if item < len(args) else None)
        elif origin is dict and len(args) == 2:
            tp = args[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _message(cls: type[BaseModel], err: Any) -> str:
    kind, loc, got = err["type"], tuple(err["loc"]), err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        parent = model_at(cls, loc[:-1])
        known = sorted(f.alias or n for n, f in parent.model_fields.items()) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; {key_path(loc[:-1]) or getattr(cls, 'root', 'top level')} accepts {known}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    for prefix, what in _KINDS.items():
        if kind in (f"{prefix}_type", f"{prefix}_parsing", f"{prefix}_from_float"):
            return f"must be {what}, got {got!r:.60}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"must be {bounds[kind]} {limit}, got {got!r:.60}"
    if kind == "literal_error":
        return f"{got!r:.60} is not one of {ctx.get('expected')}"
    msg = str(err["msg"])
    return msg[:1].lower() + msg[1:]


def describe(cls: type[BaseModel], exc: ValidationError, source: str | None = None) -> str:
    """One paragraph naming the source, the key path of the first problem and what is wrong
    (then how many more problems there are, and where)."""
    # an unknown key first: a misspelt key is usually also why a required one is "missing"
    errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
    source = source or getattr(cls, "label", "") or cls.__name__
    lines = []
    for err in errors:
        path, msg = key_path(err["loc"]), _message(cls, err)
        if not path:
            own = err["type"] in ("value_error", "assertion_error")  # a model-level check names its keys
            lines.append(msg if own else f"{getattr(cls, 'root', 'top level')}: {msg}")
        else:  # a validator that names its own key ("metrics[1]: …") is not prefixed twice
            lines.append(msg if msg.startswith(path) else f"{path}: {msg}")
    text = f"{source}: {lines[0]}"
    if len(lines) > 1:
        others = sorted({key_path(e["loc"]) or "top level" for e in errors[1:]})
        text += f" (and {len(lines) - 1} more problem(s): {', '.join(others[:8])})"
    hint = getattr(cls, "hint", "")
    return f"{text}; {hint}" if hint else text


# --- config files ----------------------------------------------------------------------------------

def read_config_file(path: str | os.PathLike, what: str = "config", hint: str = "") -> Any:
    """The data of a `.json` or `.toml` file. BadInputError for a missing file, another suffix,
    a syntax error (JSON: file:line:col) or nesting too deep for the parser."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{what} {p}: file not found" + (f"; {hint}" if hint else ""))
    text = p.read_bytes().decode("utf-8", errors="replace")
    if p.suffix not in (".json", ".toml"):
        raise BadInputError(f"{what} {p}: unknown suffix {p.suffix!r}; use .json or .toml")
    import tomllib

    kind, parse, syntax_error = (("JSON", json.loads, json.JSONDecodeError) if p.suffix == ".json"
                                 else ("TOML", tomllib.loads, tomllib.TOMLDecodeError))
    try:
        return parse(text)
    except syntax_error as exc:
        where = f":{exc.lineno}:{exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise BadInputError(f"{p}{where}: not valid {kind} ({getattr(exc, 'msg', exc)})") from None
    except RecursionError:
        raise BadInputError(f"{p}: not valid {kind} (nested too deeply)") from None
