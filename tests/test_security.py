"""Safe by default: no pickle for data we read or write, no remote code, loopback-only servers.

Python sources (lib/, tasks/, flows/, tests/, the Python inside deployments/) are parsed with `ast`,
so an aliased import (`from torch import load as L`) is caught as well as `torch.load(...)`;
shell and YAML files under deployments/ and the README are scanned for server commands and
serializers. Every rule has a negative control that proves the scanner catches the bad pattern.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY_DIRS = ("lib", "tasks", "flows", "tests", "deployments")
TEXT_GLOBS = ("deployments/*.sh", "deployments/*.yaml", "deployments/*.yml", "README.md")
PICKLE_MODULES = {"pickle", "cloudpickle", "dill", "marshal", "shelve"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


class Scanner(ast.NodeVisitor):
    """Collects (rule, line) for every unsafe pattern in one module."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, int]] = []
        self.torch_load_names: set[str] = set()  # local names bound to torch.load
        self.torch_names: set[str] = {"torch"}

    def hit(self, rule: str, node: ast.AST) -> None:
        self.hits.append((rule, getattr(node, "lineno", 0)))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] in PICKLE_MODULES:
                self.hit(f"imports {a.name}", node)
            if a.name == "torch":
                self.torch_names.add(a.asname or "torch")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = (node.module or "").split(".")[0]
        if mod in PICKLE_MODULES:
            self.hit(f"imports from {node.module}", node)
        if node.module == "torch":
            for a in node.names:
                if a.name == "load":
                    self.torch_load_names.add(a.asname or "load")

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        is_torch_load = (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name)
                         and f.value.id in self.torch_names) or (isinstance(f, ast.Name) and f.id in self.torch_load_names)
        if is_torch_load and not _is_true(_kw(node, "weights_only")):
            self.hit("torch.load without weights_only=True", node)
        if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id == "yaml":
            self.hit("yaml.load (use yaml.safe_load)", node)
        if _is_true(_kw(node, "trust_remote_code")):
            self.hit("trust_remote_code=True", node)
        if _is_true(_kw(node, "allow_pickle")):
            self.hit("allow_pickle=True", node)
        ser = _kw(node, "result_serializer")
        if isinstance(ser, ast.Constant) and isinstance(ser.value, str) and "pickle" in ser.value:
            self.hit("pickle result serializer", node)
        # Persisted results default to Prefect's pickle serializer: say json wherever results persist.
        if (isinstance(f, ast.Name) and f.id in ("task", "flow")) or (isinstance(f, ast.Attribute) and f.attr in ("task", "flow")):
            persists = _is_true(_kw(node, "persist_result")) or _kw(node, "cache_key_fn") is not None
            if persists and not (isinstance(ser, ast.Constant) and ser.value == "json"):
                self.hit("persisted task/flow result without result_serializer='json'", node)
        self.generic_visit(node)

    def _default(self, name: str, value: ast.AST | None, node: ast.AST) -> None:
        if name == "trust_remote_code" and (_is_true(value) or (isinstance(value, ast.Call) and value.args
                                                                  and _is_true(value.args[0]))):
            self.hit("trust_remote_code defaults to True", node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        args = node.args
        pos = args.posonlyargs + args.args
        for a, d in zip(pos[len(pos) - len(args.defaults):], args.defaults, strict=True):
            self._default(a.arg, d, node)
        for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
            self._default(a.arg, d, node)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:  # dataclass / pydantic fields
        if isinstance(node.target, ast.Name):
            self._default(node.target.id, node.value, node)
        self.generic_visit(node)


ALLOW = "security-scan: deliberate"  # on the line of a negative control that must stay unsafe


def scan_python(source: str) -> list[str]:
    s = Scanner()
    s.visit(ast.parse(source))
    lines = source.splitlines()
    return [rule for rule, n in s.hits if not (0 < n <= len(lines) and ALLOW in lines[n - 1])]


SERVER_RX = re.compile(r"prefect\s+server\s+start[^\n`]*")


def scan_text(text: str) -> list[str]:
    hits = []
    for cmd in SERVER_RX.findall(text):
        if "--host 127.0.0.1" not in cmd and "--help" not in cmd:
            hits.append(f"server not bound to loopback: {cmd.strip()}")
    if re.search(r"result_serializer\s*:\s*['\"]?pickle", text):
        hits.append("pickle result serializer")
    if re.search(r"--host\s+0\.0\.0\.0", text):
        hits.append("binds to every interface")
    return hits


@pytest.mark.parametrize("bad", [
    "import torch\nx = torch.load(path)",
    "import torch as T\nx = T.load(path, map_location='cpu')",
    "from torch import load\nx = load(path)",
    "from torch import load as L\nx = L(path, weights_only=False)",
    "import pickle\nobj = pickle.load(fh)",
    "from cloudpickle import loads",
    "import yaml\nyaml.load(text)",
    "def f(trust_remote_code: bool = True): ...",
    "def f(*, trust_remote_code=True): ...",
    "class Spec:\n    trust_remote_code: bool = True",
    "class Spec:\n    trust_remote_code: bool = Field(True, description='x')",
    "AutoModel.from_pretrained(p, trust_remote_code=True)",
    "np.load(p, allow_pickle=True)",
    "@task(result_serializer='pickle')\ndef t(): ...",
    "@task(cache_key_fn=k, persist_result=True)\ndef t(): ...",
])
def test_scanner_catches_bad_python(bad):
    assert scan_python(bad), f"scanner missed: {bad!r}"


def test_the_allow_marker_is_per_line():
    assert scan_python(f"import torch\nx = torch.load(p)  # {ALLOW}: proves the pickle is real") == []
    assert scan_python(f"import torch\n# {ALLOW}\nx = torch.load(p)") != []


def test_scanner_accepts_safe_python():
    good = ("import torch\nfrom torch import load\nx = torch.load(p, map_location='cpu', weights_only=True)\n"
            "y = load(p, weights_only=True)\ndef f(trust_remote_code: bool = False): ...\n"
            "@task(cache_key_fn=k, persist_result=True, result_serializer='json')\ndef t(): ...\n"
            "import yaml\nyaml.safe_load(text)\n")
    assert scan_python(good) == []


@pytest.mark.parametrize("bad", ["prefect server start --port 4200", "prefect server start --host 0.0.0.0",
                                 "result_serializer: pickle"])
def test_scanner_catches_bad_text(bad):
    assert scan_text(bad), f"scanner missed: {bad!r}"


def _python_files() -> list[Path]:
    return sorted(p for d in PY_DIRS for p in (ROOT / d).rglob("*.py")
                  if "__pycache__" not in p.parts and p.resolve() != Path(__file__).resolve())


def test_no_unsafe_loading_in_project_sources():
    files = _python_files()
    assert any(p.parts[-2] == "deployments" or "deployments" in p.parts for p in files) or not list(
        (ROOT / "deployments").rglob("*.py")), "deployments/ Python was not scanned"
    hits = {str(p.relative_to(ROOT)): scan_python(p.read_text(encoding="utf-8")) for p in files}
    hits = {k: v for k, v in hits.items() if v}
    assert hits == {}, f"unsafe patterns: {hits}"


def test_servers_bind_to_loopback_and_nothing_pickles_in_deployments_and_docs():
    files = sorted({p for g in TEXT_GLOBS for p in ROOT.glob(g)})
    assert any(p.name == "README.md" for p in files) and any(p.suffix == ".sh" for p in files)
    hits = {str(p.relative_to(ROOT)): scan_text(p.read_text(encoding="utf-8")) for p in files}
    hits = {k: v for k, v in hits.items() if v}
    assert hits == {}, f"unsafe patterns: {hits}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert SERVER_RX.search(readme), "README shows no server command"
