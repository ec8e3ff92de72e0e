"""docs/bad-inputs.md is what tests/gen_bad_inputs.py makes of the tests today, and every case it cites exists."""

from __future__ import annotations

import runpy
from pathlib import Path

GEN = runpy.run_path(str(Path(__file__).resolve().parent / "gen_bad_inputs.py"))


def test_bad_inputs_doc_is_current_and_covers_the_ground():
    cases = GEN["cases"]()  # checks every node id against its file
    assert len(cases) >= 45
    assert {c[0] for c in cases} == {"config", "data", "model", "runtime"}
    assert GEN["DOC"].read_text(encoding="utf-8") == GEN["render"](), (
        "docs/bad-inputs.md is out of date: .venv/bin/python tests/gen_bad_inputs.py"
    )


def test_a_case_citing_a_missing_test_is_refused():
    import pytest

    with pytest.raises(SystemExit, match="has no test"):
        GEN["check_node"]("tests/flows/test_cli.py::test_that_does_not_exist")
