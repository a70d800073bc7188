"""lib.core.progress: off by default (library calls print nothing), one summary line per stage in
a pipe, a live bar on a terminal, and a stage that fails says so."""

from __future__ import annotations

import io

import pytest

from lib.core import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _off_afterwards():
    yield
    progress.disable()


def test_off_unless_enabled(capsys):
    with progress.stage("capture x", total=3, unit="samples") as st:
        st.advance(3)
    assert capsys.readouterr() == ("", "")


def test_one_line_per_stage_in_a_pipe():
    out = io.StringIO()
    progress.enable(out)
    with progress.stage("capture x", total=5, unit="samples") as st:
        st.advance(2)
        assert out.getvalue() == ""  # nothing until the stage ends: logs stay short
        assert "2/5 samples" in st.line() and "left" in st.line()
        st.advance(3)
    with progress.stage("rotate r", total=2, unit="layers") as st:
        st.advance(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("capture x: 5/5 samples in ") and lines[1].startswith("rotate r: 2/2 layers in ")


def test_a_failing_stage_is_marked_and_the_error_propagates():
    out = io.StringIO()
    progress.enable(out)
    with pytest.raises(ValueError), progress.stage("fold f", total=3, unit="steps") as st:
        st.advance()
        raise ValueError("boom")
    assert out.getvalue() == "fold f: 1/3 steps, " + out.getvalue().split(", ", 1)[1]
    assert out.getvalue().rstrip().endswith("(stopped)")


def test_a_terminal_gets_a_live_bar_with_counts():
    term = Terminal()
    progress.enable(term)
    with progress.stage("qa n", total=4, unit="models") as st:
        for _ in range(4):
            st.advance()
    text = term.getvalue()
    assert "qa n" in text and "4/4" in text and "models" in text and "left" in text
