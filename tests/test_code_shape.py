"""Code shape: no function (method, nested function) in genrec_fast/ or kernels/ is longer than 80 lines,
counted from its ``def`` line to its last line (docstring and comments included, decorators not). There is no
allow-list: a longer function is split into named steps."""
import ast
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def long_functions(source: str, max_lines: int = MAX_LINES) -> List[Tuple[str, int, int]]:
    """(name, first line, length) of every function in ``source`` longer than ``max_lines``."""
    return [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > max_lines]


def test_the_length_check_counts_def_to_last_line():
    def source(n_body: int, indent: str = "") -> str:
        return f"{indent}def f():\n" + "".join(f"{indent}    x{i} = {i}\n" for i in range(n_body))

    assert long_functions(source(MAX_LINES - 1)) == []  # exactly MAX_LINES lines
    assert long_functions(source(MAX_LINES)) == [("f", 1, MAX_LINES + 1)]
    assert long_functions("class C:\n" + source(MAX_LINES, "    ")) == [("f", 2, MAX_LINES + 1)]  # methods too


def test_no_function_in_the_package_or_the_kernels_is_longer_than_80_lines():
    files = sorted((ROOT / "genrec_fast").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    assert len(files) > 40 and any(p.name == "model.py" for p in files)  # the walk found the sources
    long = [(str(p.relative_to(ROOT)), *hit) for p in files for hit in long_functions(p.read_text())]
    assert not long, f"functions over {MAX_LINES} lines (split them into named steps): {long}"
