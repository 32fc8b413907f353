"""Write backprop_exercise.ipynb, the blank twin of backprop.ipynb: `python notebooks/make_exercise.py`.

Every line of the solved notebook that ends with the comment `# exercise` is a gradient derived by
hand; the twin has a `# TODO` line in its place and every other line as it is, the checks
included. An assignment `target = ...` keeps its target, so the reader sees what to compute:

    d.fc = d.gelu * dgelu_dfc                  # (B, T, 4C)  # exercise
becomes
    d.fc = ...  # TODO: (B, T, 4C)

(`...` is Python's Ellipsis, which `cmp` refuses with "still a blank"); any other statement becomes
`...  # TODO: <its target> = ?` or `...  # TODO: <the function it calls>(?)`.
tests/test_notebook.py checks that the committed twin is this script's output and that it matches
the solved notebook line for line outside the blanks. With --check: exit 1 when the committed
twin is out of date.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOLVED, EXERCISE = HERE / "backprop.ipynb", HERE / "backprop_exercise.ipynb"
MARK = "# exercise"
# a plain assignment: one target (a name, an attribute or a subscript with no slice), then " = "
ASSIGNMENT = re.compile(r"^(\s*)([A-Za-z_][\w.]*(?:\[[^\]:]*\])?) = (.*)$")


def blank(line: str) -> str:
    """The TODO line that stands in for one solved line ending with MARK."""
    code = line[:-len(MARK)].rstrip()
    code, _, comment = code.partition("  # ")         # a shape or a hint: kept for the reader
    hint = f": {comment.strip()}" if comment.strip() else ""
    m = ASSIGNMENT.match(code)
    if m:
        return f"{m.group(1)}{m.group(2)} = ...  # TODO{hint}"
    indent, statement = code[:len(code) - len(code.lstrip())], code.strip()
    what = statement.split(" = ")[0] + " = ?" if " = " in statement else statement.split("(")[0] + "(?)"
    return f"{indent}...  # TODO: {what}{hint.replace(':', ';', 1)}"


def exercise(nb):
    """The twin of a solved notebook (a copy; the solved one is left as it is)."""
    twin = nbformat.reads(nbformat.writes(nb), as_version=4)
    for cell in twin.cells:
        if cell.cell_type == "code":
            cell.source = "\n".join(blank(line) if line.rstrip().endswith(MARK) else line
                                    for line in cell.source.split("\n"))
    return twin


def main(argv) -> int:
    twin = nbformat.writes(exercise(nbformat.read(SOLVED, as_version=4)))
    if "--check" in argv:
        if not EXERCISE.exists() or EXERCISE.read_text() != twin:
            print(f"{EXERCISE.name} is out of date: run python notebooks/make_exercise.py", file=sys.stderr)
            return 1
        return 0
    EXERCISE.write_text(twin)
    print(f"wrote {EXERCISE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
