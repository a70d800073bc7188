"""Safe by default: no pickle for data we read or write, no remote code, loopback-only server.

A source scan over lib/, tasks/, flows/ and deployments/ (tests may use pickle-free fixtures only
too). Each rule carries a negative control that proves the scanner would catch the bad pattern.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("lib", "tasks", "flows") for p in (ROOT / d).rglob("*.py")]

RULES = {
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)"),
    "pickle.load(s)": re.compile(r"\bpickle\.loads?\("),
    "cloudpickle": re.compile(r"\bcloudpickle\b"),
    "trust_remote_code defaulting to True": re.compile(r"trust_remote_code\s*(:\s*bool\s*)?=\s*True"),
    "numpy allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "pickle result serializer": re.compile(r"result_serializer\s*=\s*[\"']pickle"),
}


def offending(text: str) -> list[str]:
    return [name for name, rx in RULES.items() if rx.search(text)]


@pytest.mark.parametrize("bad", [
    "x = torch.load(path)",
    "x = torch.load(path, map_location='cpu')",
    "obj = pickle.load(fh)",
    "def f(trust_remote_code: bool = True): ...",
    "np.load(p, allow_pickle=True)",
    "@task(result_serializer='pickle')",
])
def test_scanner_catches_bad_patterns(bad):
    assert offending(bad), f"scanner missed: {bad}"


def test_scanner_accepts_safe_patterns():
    assert offending("torch.load(path, map_location='cpu', weights_only=True)") == []
    assert offending("def f(trust_remote_code: bool = False): ...") == []


def test_no_unsafe_loading_in_project_sources():
    assert SOURCES, "no sources found"
    hits = {str(p.relative_to(ROOT)): offending(p.read_text(encoding="utf-8")) for p in SOURCES}
    hits = {k: v for k, v in hits.items() if v}
    assert hits == {}, f"unsafe patterns: {hits}"


def test_documented_server_command_binds_to_loopback():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cmds = re.findall(r"prefect server start[^\n`]*", readme)
    assert cmds, "README shows no server command"
    for c in cmds:
        assert "--host 127.0.0.1" in c, f"server command not bound to loopback: {c}"
