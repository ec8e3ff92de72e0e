"""The codebase's shape rules, read from the source's syntax tree: no function takes more than six parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The package (flows/ is `ftflow`, tasks/ and configs/ beneath it) and the bench scripts.
CHECKED = ("flows", "tasks", "configs", "bench")
MAX_PARAMS = 6


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Positional and keyword-only parameters, without a method's `self`/`cls`; `*args`/`**kwargs` do not count."""
    args = fn.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def long_signatures(root: Path) -> list[str]:
    found = []
    for folder in CHECKED:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names = parameters(node)
                    if len(names) > MAX_PARAMS:
                        rel = path.relative_to(root)
                        found.append(f"{rel}:{node.lineno} {node.name}({', '.join(names)}): {len(names)} parameters")
    return found


@pytest.mark.fast
def test_no_function_takes_more_than_six_parameters():
    offenders = long_signatures(REPO)
    assert not offenders, (
        f"{len(offenders)} function(s) over {MAX_PARAMS} parameters; group what travels together in a frozen "
        "dataclass or pass the StageContext:\n" + "\n".join(offenders)
    )


@pytest.mark.fast
def test_the_count_skips_self_and_star_args(tmp_path):
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "m.py").write_text(
        "class C:\n"
        "    def ok(self, a, b, c, d, e, f, *args, **kwargs): ...\n"
        "def ok(a, b, c, *, d, e, f): ...\n"
        "def too_long(a, b, c, d, /, e, f, *, g=1): ...\n"
        "async def nested():\n"
        "    def inner(a, b, c, d, e, f, g): ...\n"
    )
    found = long_signatures(tmp_path)
    assert [line.split(" ")[1].split("(")[0] for line in found] == ["too_long", "inner"]
    assert found[0].startswith("flows/m.py:4 ") and found[0].endswith("7 parameters")
