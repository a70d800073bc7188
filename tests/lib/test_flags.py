"""Flags derived from an options model (lib.core.flags): every field is a flag, values parse by
the field's type, a config file sits under the flags, and errors name where a value came from."""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

import pytest
from pydantic import Field

from lib.core.errors import BadInputError
from lib.core.flags import add_model_flags, given_flags, validate_layers
from lib.core.options import Options, PathStr, Seq, one_of
from lib.pipeline.config import PipelineConfig


class Sample(Options):
    label = "sample options"

    name: str = Field(..., description="a required string")
    limit: int | None = Field(None, ge=1, description="an optional count")
    ratio: float = Field(0.5, description="a share (50% = 0.5)")
    on: bool = Field(True, description="a switch")
    layers: Seq[str] = Field((), description="a list")
    mode: one_of(("fast", "exact")) = Field("fast", description="a choice")
    extra: dict[str, Any] = Field({}, description="a table")
    home: PathStr | None = Field(None, description="an optional path")


def parse(model, *argv: str) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    flags = add_model_flags(p, model)
    return given_flags(p.parse_args(list(argv)), flags)


def test_each_kind_of_field_parses_to_its_type():
    got = parse(Sample, "--name", "x", "--limit", "3", "--ratio", "0.25", "--no-on", "--layers", "a,b", "--layer", "c",
                "--mode", "exact", "--extra", '{"k": [1, 2]}', "--home", "/tmp/h")
    assert got == {"name": "x", "limit": 3, "ratio": 0.25, "on": False, "layers": ["a", "b", "c"], "mode": "exact",
                   "extra": {"k": [1, 2]}, "home": "/tmp/h"}
    opts = validate_layers(Sample, [("command line", got)])
    assert opts.layers == ("a", "b", "c") and opts.on is False
    # only what was given; `none` unsets an optional field; '' is an empty list
    assert parse(Sample, "--limit", "none", "--layers", "") == {"limit": None, "layers": []}
    assert parse(Sample) == {}


def test_a_switch_that_can_also_be_auto_takes_an_optional_value():
    from typing import Literal

    class Place(Options):
        label = "placement"
        remote: bool | Literal["auto"] = Field("auto", description="where")

    assert parse(Place, "--remote") == {"remote": True}  # the flag alone: true, as a switch
    assert parse(Place, "--remote", "false") == {"remote": False}
    assert parse(Place, "--remote", "auto") == {"remote": "auto"}
    with pytest.raises(BadInputError, match="remote"):
        validate_layers(Place, [("command line", parse(Place, "--remote", "sometimes"))])


@pytest.mark.parametrize("argv,needle", [(["--limit", "eight"], "must be an integer, got 'eight'"),
                                         (["--mode", "slow"], "'slow' is not one of ['fast', 'exact']"),
                                         (["--ratio", "x"], "must be a number")])
def test_wrong_values_are_argparse_errors(argv, needle):
    p = argparse.ArgumentParser(prog="t")
    add_model_flags(p, Sample)
    assert "50% = 0.5" in p.format_help()  # a '%' in a description is text, not a format
    err = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(err):
        p.parse_args(argv)
    assert exc.value.code == 2 and needle in err.getvalue()


def test_a_field_added_later_is_a_flag_without_editing_the_command():
    class Later(PipelineConfig):
        partitions: int = Field(1, ge=1, description="capture partitions per model")

    got = parse(Later, "--teacher", "t", "--student", "s", "--partitions", "3")
    assert validate_layers(Later, [("command line", got)]).partitions == 3
    with pytest.raises(BadInputError, match=r"command line: partitions: must be >= 1, got 0"):
        validate_layers(Later, [("command line", parse(Later, "--teacher", "t", "--student", "s", "--partitions", "0"))])


def test_every_pipeline_config_field_is_a_pipeline_flag():
    from flows.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["pipeline"]
    text = sub.format_help()
    for name, field in PipelineConfig.model_fields.items():
        flag = "--" + (field.alias or name).replace("_", "-")
        assert flag in text, f"PipelineConfig.{name} has no {flag} flag"
        assert field.description.split(" (")[0][:30] in " ".join(text.split()), f"{flag}: help is not the description"


def test_flags_override_the_file_key_by_key_and_errors_name_their_source():
    file = {"name": "from-file", "limit": 5, "layers": ["a"]}
    opts = validate_layers(Sample, [("s.toml", file), ("command line", parse(Sample, "--limit", "7"))])
    assert (opts.name, opts.limit, opts.layers) == ("from-file", 7, ("a",))
    with pytest.raises(BadInputError, match=r"s.toml: nmae: unknown key \(did you mean 'name'\?\)"):
        validate_layers(Sample, [("s.toml", {"nmae": "x"}), ("command line", {"name": "y"})])
    with pytest.raises(BadInputError, match=r"s.toml: layers\[1\]: must be a string, got 2"):
        validate_layers(Sample, [("s.toml", {"name": "x", "layers": ["a", 2]})])
    with pytest.raises(BadInputError, match=r"command line: limit: must be >= 1, got 0"):
        validate_layers(Sample, [("s.toml", {"name": "x", "limit": 3}), ("command line", {"limit": 0})])
    with pytest.raises(BadInputError, match=r"s.toml: must hold a table/object"):
        validate_layers(Sample, [("s.toml", ["name"])])
    flags = add_model_flags(argparse.ArgumentParser(), Sample)
    with pytest.raises(BadInputError, match=r"--name is required: give it on the command line or as `name` in --config"):
        validate_layers(Sample, [("s.toml", {})], flags)
