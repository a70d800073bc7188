"""The shape of the code: layering (import-linter contracts in pyproject.toml), no import cycles,
small modules, no repeated blocks in lib/.

Run: `.venv/bin/python -m pytest tests/test_architecture.py -q` (or `lint-imports` for the contracts).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 420  # "one concept per module, about 400 lines at most"
WINDOW = 6  # a block of six or more lines written twice is one too many


def test_import_contracts_hold(monkeypatch):
    """flows -> tasks -> lib, lib never imports prefect, and stage packages only import downwards."""
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0, \
        "an import-linter contract is broken; run `lint-imports` in the checkout for the details"


def _lib_graph():
    import grimp
    import networkx as nx

    graph = grimp.build_graph("lib", cache_dir=None)
    g = nx.DiGraph()
    for mod in graph.modules:
        g.add_node(mod)
        for dep in graph.find_modules_directly_imported_by(mod):
            g.add_edge(mod, dep)
    return g


def test_lib_has_no_import_cycles():
    import networkx as nx

    cycles = [c for c in nx.simple_cycles(_lib_graph()) if not (len(c) == 2 and "lib" in c)]
    cycles = [c for c in cycles if c != ["lib"]]
    assert not cycles, "import cycles in lib/: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_the_cycle_check_can_fail():
    """Negative control: the same check finds a planted two-module cycle."""
    import networkx as nx

    g = _lib_graph()
    g.add_edge("lib.core.errors", "lib.store.atomic")
    g.add_edge("lib.store.atomic", "lib.core.errors")
    assert any(set(c) == {"lib.core.errors", "lib.store.atomic"} for c in nx.simple_cycles(g))


def _lib_files() -> list[Path]:
    return sorted(p for p in (ROOT / "lib").rglob("*.py") if "__pycache__" not in p.parts)


def test_lib_modules_hold_one_concept_each():
    big = {str(p.relative_to(ROOT)): n for p in _lib_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"lib modules over {MAX_LINES} lines (split them by concept): {big}"


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that carry code: no blanks, comments, imports or
    docstring-only lines, so that only real logic can repeat."""
    out = []
    in_doc = False
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        quotes = line.count('"""')
        if in_doc:
            in_doc = quotes % 2 == 0
            continue
        if quotes == 1 and line.startswith('"""'):
            in_doc = True
            continue
        if not line or line.startswith(("#", "import ", "from ", '"""')) or line in (")", "]", "}", "):", "try:",
                                                                                   "else:", "finally:", "pass"):
            continue
        out.append((n, line))
    return out


def repeated_blocks(files: list[Path], window: int = WINDOW) -> list[str]:
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in files:
        lines = _code_lines(path)
        for i in range(len(lines) - window + 1):
            block = tuple(t for _, t in lines[i:i + window])
            seen[block].append(f"{os.path.relpath(path, ROOT)}:{lines[i][0]}")
    return [" and ".join(places) for block, places in seen.items() if len(places) > 1]


def test_no_block_is_written_twice_in_lib():
    dups = repeated_blocks(_lib_files())
    assert not dups, f"{len(dups)} repeated {WINDOW}-line block(s) in lib/, e.g. {dups[:3]}"


def test_the_repeat_check_can_fail(tmp_path):
    """Negative control: a copied function is found."""
    body = "def f(a, b):\n" + "".join(f"    x{i} = a + {i} * b\n" for i in range(7)) + "    return x0\n"
    (tmp_path / "a.py").write_text(body)
    (tmp_path / "b.py").write_text("y = 1\n" + body.replace("def f", "def g"))
    assert repeated_blocks([tmp_path / "a.py", tmp_path / "b.py"])


@pytest.mark.parametrize("folder", ["tasks", "flows"])
def test_tasks_live_in_tasks(folder):
    """Every @task is defined in tasks/; flows only compose them."""
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / folder).rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if line.lstrip().startswith("@task")]
    if folder == "flows":
        assert not hits, f"@task defined outside tasks/: {hits}"
    else:
        assert hits
