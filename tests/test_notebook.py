"""notebooks/backprop.ipynb (backprop by hand through GPT-2) runs from top to bottom, and its
checks say what they should.

Its `cmp` prints one line per check: exact, approximate or WRONG. Every check must agree except in
the cell tagged "expect-wrong" (the `dwte[idx] += g` demonstration, which must be WRONG). Each cell
tagged "planted-bug" runs `npgpt gradcheck` with a bug planted, and must print FAIL rows. The
committed file carries no outputs.
"""
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "backprop.ipynb"
AGREES = re.compile(r"\s(exact|approximate)\s+max diff ")


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


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs; clear them before committing"
            assert cell.execution_count is None, f"cell {i} has execution count {cell.execution_count}"


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
    # every intermediate, every parameter, the models and the AdamW steps: well over 100 checks
    assert agreeing >= 100, f"only {agreeing} cmp lines agreed; did cmp stop printing?"

    expect_wrong = [cell for cell in code if "expect-wrong" in tags(cell)]
    assert len(expect_wrong) == 1 and "WRONG" in cell_text(expect_wrong[0])

    planted = [cell for cell in code if "planted-bug" in tags(cell)]
    assert len(planted) == 3
    for cell in planted:
        text = cell_text(cell)
        fails = [line for line in text.splitlines() if line.endswith(" FAIL")]
        assert fails and "gradcheck FAILED" in text, f"the planted bug went unnoticed:\n{cell.source}\n{text}"

    # the clean gradcheck table before the bugs
    assert any("gradcheck passed" in cell_text(cell) for cell in code)
