"""notebooks/backprop.ipynb (backprop by hand through GPT-2) runs from top to bottom, and its
checks say what they should; backprop_exercise.ipynb is its blank twin.

Its `cmp` prints one line per check: exact, approximate or WRONG, and raises on WRONG unless told
not to. Every check must agree except in the cell tagged "expect-wrong" (the `dwte[idx] += g`
demonstration, which must be WRONG); the number of checks is pinned. Each cell tagged
"planted-bug" runs `npgpt gradcheck` with a bug planted, and must print FAIL rows. The twin is
make_exercise.py's output, and equals the solved notebook line for line except where a line
marked `# exercise` became a `# TODO` line. The committed files carry no outputs.
"""
import importlib.util
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "backprop.ipynb"
EXERCISE = ROOT / "notebooks" / "backprop_exercise.ipynb"
AGREES = re.compile(r"\s(exact|approximate)\s+max diff ")
CHECKS = 171        # the cmp lines that agree in a run of the solved notebook
BLANKS = 80         # the lines marked "# exercise": blank in the twin


def cell_text(cell) -> str:
    """What a code cell printed: its stdout and stderr streams and the text of its results."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


@pytest.mark.parametrize("path", [NOTEBOOK, EXERCISE], ids=["solved", "exercise"])
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs; clear them before committing"
            assert cell.execution_count is None, f"cell {i} has execution count {cell.execution_count}"


def make_exercise():
    spec = importlib.util.spec_from_file_location("make_exercise", ROOT / "notebooks" / "make_exercise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_exercise_is_the_scripts_output():
    script = make_exercise()
    assert EXERCISE.read_text() == nbformat.writes(script.exercise(nbformat.read(NOTEBOOK, as_version=4))), \
        "backprop_exercise.ipynb is out of date: run python notebooks/make_exercise.py"
    assert script.main(["--check"]) == 0


def test_the_exercise_matches_the_solved_notebook_outside_the_blanks():
    solved, twin = (nbformat.read(p, as_version=4) for p in (NOTEBOOK, EXERCISE))
    assert len(solved.cells) == len(twin.cells)
    blanks = 0
    for i, (a, b) in enumerate(zip(solved.cells, twin.cells)):
        assert (a.cell_type, a.metadata) == (b.cell_type, b.metadata), i
        lines_a, lines_b = a.source.split("\n"), b.source.split("\n")
        assert len(lines_a) == len(lines_b), f"cell {i}: {len(lines_a)} lines, the twin has {len(lines_b)}"
        for la, lb in zip(lines_a, lines_b):
            if la.rstrip().endswith("# exercise"):
                blanks += 1
                indent = la[:len(la) - len(la.lstrip())]
                assert lb.startswith(indent) and "...  # TODO" in lb and lb.strip() != la.strip(), (i, la, lb)
                target = la.split(" = ")[0] if re.match(r"\s*[\w.]+(\[[^\]:]*\])? = ", la) else None
                assert target is None or lb.startswith(target + " = ...  # TODO"), (i, la, lb)
            else:
                assert la == lb, f"cell {i}: {la!r} became {lb!r}"
    assert blanks == BLANKS
    solved_text = "\n".join(c.source for c in solved.cells)
    for forms in ["cmp(", "assert "]:                # every check kept
        assert solved_text.count(forms) == "\n".join(c.source for c in twin.cells).count(forms)


def test_the_exercise_stops_at_its_first_blank():
    """Run as it is, the twin stops at the first cmp of a blank, naming it (cmp is strict)."""
    nb = nbformat.read(EXERCISE, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="logits: still a blank"):
        client.execute()


@pytest.mark.slow
def test_notebook_runs_and_its_checks_hold():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a cell that raises fails the test here (CellExecutionError names the cell and the traceback)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]

    agreeing = 0
    for cell in code:
        text = cell_text(cell)
        if not {"expect-wrong", "planted-bug"} & set(tags(cell)):
            wrong = [line for line in text.splitlines() if "WRONG" in line]
            assert not wrong, f"a check failed in\n{cell.source}\n->\n" + "\n".join(wrong)
            assert not [line for line in text.splitlines() if line.endswith(" FAIL")], text
            agreeing += len(AGREES.findall(text))
    # every intermediate, every parameter, the dropout block, the models and the AdamW steps
    assert agreeing == CHECKS, f"{agreeing} cmp lines agreed, expected {CHECKS}"
    assert f"checks that agreed: {{'exact': " in cell_text(code[-1])
    counted = re.search(r"'exact': (\d+), 'approximate': (\d+)", cell_text(code[-1]))
    assert int(counted[1]) + int(counted[2]) == CHECKS

    expect_wrong = [cell for cell in code if "expect-wrong" in tags(cell)]
    assert len(expect_wrong) == 1 and "WRONG" in cell_text(expect_wrong[0])
    # the claims the text makes are asserted in the notebook itself, so a run that got here holds them
    assert "the hints' rows hold" in "".join(cell_text(cell) for cell in code)

    planted = [cell for cell in code if "planted-bug" in tags(cell)]
    assert len(planted) == 3
    for cell in planted:
        text = cell_text(cell)
        fails = [line for line in text.splitlines() if line.endswith(" FAIL")]
        assert fails and "gradcheck FAILED" in text, f"the planted bug went unnoticed:\n{cell.source}\n{text}"

    # the clean gradcheck table before the bugs
    assert any("gradcheck passed" in cell_text(cell) for cell in code)
