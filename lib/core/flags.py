"""Command-line flags derived from an `Options` model, and a config file beneath them.

A command that takes a whole options model (`tourguide pipeline` takes `PipelineConfig`) does not
list its flags by hand: `add_model_flags(parser, Model)` adds one flag per field, from the
model's JSON schema (the same schema Prefect renders as a form), so a field added to the model
later is a flag at once:

    field              flag                                     value
    max_length: int    --max-length N                           `none` unsets an optional field
    dtype: one_of(...) --dtype {float32,float16,bfloat16}
    layers: Seq[str]   --layers A,B  (or --layer A --layer B)   repeatable, comma lists; "" = empty
    solve_perms: bool  --solve-perms / --no-solve-perms
    mode: bool | "auto" --mode (= true), --mode false, --mode auto
    a table field      --field '{"json": "object"}'

Help comes from the field's description and default. Only flags the user gave are returned by
`given_flags`, so `validate_layers(Model, [(file, data), ("command line", flags)])` lets flags
override a config file key by key; errors quote the key path and name where the value came from
(`pipe.toml: teacherr: unknown key (did you mean 'teacher'?) …`). Only argparse, json and pydantic
are imported here: the CLI refuses bad input before Prefect or torch are imported.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from lib.core.errors import BadInputError
from lib.core.options import describe

DEST_PREFIX = "model_field__"  # argparse dest of a derived flag: never clashes with a command's own flags


@dataclass(frozen=True)
class FieldFlag:
    """One derived flag: the field's key (its alias when it has one), the flag, and how values parse."""

    key: str
    flag: str
    kind: str  # "bool" | "scalar" | "list"
    item_type: str | None  # JSON-schema type of the value (of each item for lists); None: JSON text
    nullable: bool
    choices: tuple[str, ...] | None
    required: bool
    default: Any
    description: str
    bare: bool = False  # a boolean among other alternatives: the flag alone means true

    @property
    def dest(self) -> str:
        return DEST_PREFIX + self.key


def _alternatives(prop: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], bool]:
    alts = list(prop.get("anyOf") or prop.get("oneOf") or [prop])
    nullable = any(a.get("type") == "null" for a in alts)
    return [a for a in alts if a.get("type") != "null"], nullable


def model_flags(model: type[BaseModel], skip: Iterable[str] = ()) -> list[FieldFlag]:
    """The flags of `model`'s fields, in field order (keys in `skip` left out)."""
    schema = model.model_json_schema(by_alias=True)
    props, required = schema.get("properties", {}), set(schema.get("required", ()))
    out = []
    for key, prop in props.items():
        if key in skip:
            continue
        alts, nullable = _alternatives(prop)
        kind, item_type, choices = "scalar", None, None
        bare = len(alts) > 1 and any(a.get("type") == "boolean" for a in alts)
        if len(alts) == 1:
            alt = alts[0]
            if alt.get("type") == "boolean":
                kind = "bool"
            elif alt.get("type") == "array" and isinstance(alt.get("items"), Mapping):
                items = alt["items"]
                kind, item_type = "list", items.get("type") if items.get("type") in _PARSERS else None
                choices = tuple(items["enum"]) if "enum" in items else None
            else:
                item_type = alt.get("type") if alt.get("type") in _PARSERS else None
                choices = tuple(alt["enum"]) if "enum" in alt else None
        out.append(FieldFlag(key=key, flag="--" + key.replace("_", "-"), kind=kind, item_type=item_type,
                             nullable=nullable, choices=choices, required=key in required,
                             default=prop.get("default"), description=str(prop.get("description") or ""),
                             bare=bare))
    return out


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


_PARSERS = {"integer": _int, "number": _float, "string": str}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain string; the model says whether it may be one


def _value_parser(f: FieldFlag):
    one = _PARSERS[f.item_type] if f.item_type else _json

    def parse(text: str) -> Any:
        if f.kind == "list":
            return [one(part.strip()) for part in text.split(",") if part.strip()]
        if f.nullable and text.strip().lower() in ("none", "null"):
            return None
        value = one(text)
        if f.choices and value not in f.choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {list(f.choices)}")
        return value

    return parse


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) if value else "empty"
    return str(value)


def add_model_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel], *,
                    skip: Iterable[str] = (), default_help: Mapping[str, str] | None = None) -> list[FieldFlag]:
    """Add one flag per field of `model` (see the module doc); returns them. `default_help`
    replaces the "(default: …)" text of a field whose default the command computes itself."""
    default_help = dict(default_help or {})
    taken = {s for a in getattr(parser, "_actions", ()) for s in a.option_strings}
    flags = model_flags(model, skip)
    keys = {f.key for f in flags}
    for f in flags:
        if f.key in default_help:
            dflt = default_help[f.key]
        elif f.required:
            dflt = "required, here or in --config"
        elif "default" in f.description:  # the description says it better ("default: dtype")
            dflt = ""
        else:
            dflt = f"default: {_shown(f.default)}"
        text = " ".join(x for x in (f.description, f"({dflt})" if dflt else "") if x).replace("%", "%%")  # argparse formats help
        names = [f.flag]
        if f.kind == "bool":
            parser.add_argument(*names, dest=f.dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=text)
            continue
        if f.kind == "list":
            # --layer beside --layers (the other commands spell repeatable flags in the singular)
            singular = f.key[:-1] if f.key.endswith("s") else None
            if singular and singular not in keys and "--" + singular.replace("_", "-") not in taken:
                names.append("--" + singular.replace("_", "-"))
            text += "; repeatable, or a comma list ('' for none)"
            if f.choices:
                text += f"; any of {','.join(f.choices)}"
            parser.add_argument(*names, dest=f.dest, action="extend", type=_value_parser(f), default=argparse.SUPPRESS,
                                metavar=f.key.upper().rstrip("S") or "ITEM", help=text)
            continue
        if f.nullable:
            text += "; 'none' unsets it"
        extra: dict[str, Any] = {"nargs": "?", "const": True} if f.bare else {}
        if f.bare:
            text += "; the flag alone means true"
        parser.add_argument(*names, dest=f.dest, type=_value_parser(f), default=argparse.SUPPRESS, **extra,
                            metavar="{" + ",".join(f.choices) + "}" if f.choices else f.key.upper(), help=text)
    return flags


def given_flags(args: argparse.Namespace, flags: Sequence[FieldFlag]) -> dict[str, Any]:
    """{field key: value} for the derived flags present on the command line (lists may be empty)."""
    ns = vars(args)
    return {f.key: ns[f.dest] for f in flags if f.dest in ns}


def validate_layers(model: type[BaseModel], layers: Sequence[tuple[str, Mapping[str, Any]]],
                    flags: Sequence[FieldFlag] = ()) -> Any:
    """`model` from data layered lowest first (e.g. [("pipe.toml", file data), ("command line",
    flags)]): a later layer's key replaces an earlier one's. A BadInputError names the layer that
    gave the first wrong key and its key path; a missing required key names its flag."""
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, layer in layers:
        if not isinstance(layer, Mapping):
            raise BadInputError(f"{source}: must hold a table/object of {model.__name__} keys at the top level, got "
                                f"{type(layer).__name__}")
        for key, value in layer.items():
            data[key], origin[key] = value, source
    try:
        return BaseModel.model_validate.__func__(model, data)  # type: ignore[attr-defined]
    except ValidationError as exc:
        # describe() reports an unknown key first, then the others in order: name the same one's source
        first = min(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
        top = first["loc"][0] if first["loc"] else None
        by_key = {f.key: f.flag for f in flags}
        if first["type"] == "missing" and top in by_key:
            others = [e for e in exc.errors(include_url=False) if e is not first]
            raise BadInputError(f"{by_key[top]} is required: give it on the command line or as `{top}` in --config"
                                + (f" (and {len(others)} more problem(s))" if others else "")) from None
        source = origin.get(top, layers[-1][0] if layers else model.__name__)
        raise BadInputError(describe(model, exc, source)) from None
