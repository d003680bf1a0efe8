"""The course notebook, notebooks/esd_course.ipynb: it runs top to bottom in a fresh kernel with
the solutions, offline; the students' copy has no solution left and runs up to its first
exercise; git holds it without outputs. The kernels write into pytest's tmp_path (TMPDIR), never
into the repository."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "esd_course.ipynb"
STUDENT_COPY = ROOT / "notebooks" / "student_copy.py"

# Seconds one cell may take: the longest trains and measures for about a minute here
CELL_TIMEOUT = 900


def tags(cell):
    """The Jupyter tags of a notebook cell."""
    return cell.get("metadata", {}).get("tags", [])


def execute(notebook, cwd, tmp_path, monkeypatch):
    """Run `notebook` in a fresh kernel started in `cwd`, offline, its temporary files in
    tmp_path; raises CellExecutionError on the first cell that fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return notebook


def write_student_copy(output):
    """notebooks/student_copy.py as a teacher runs it; returns the copy it wrote."""
    command = [sys.executable, str(STUDENT_COPY), "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return nbformat.read(output, as_version=4)


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    # A notebook saved after a run holds them: clear them before committing (in Jupyter:
    # Edit > Clear Outputs of All Cells)
    for cell in code_cells:
        assert cell.outputs == [], f"outputs in the cell {cell.source[:40]!r}"
        assert cell.execution_count is None, f"an execution count in {cell.source[:40]!r}"


def test_every_exercise_has_a_solution_after_it():
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    exercises = [i for i, cell in enumerate(cells) if "exercise" in tags(cell)]
    assert len(exercises) == 4
    for i in exercises:
        assert "solution" in tags(cells[i + 1]), cells[i].source[:60]


def repository_files():
    """The repository's files, hidden folders and caches left out."""
    return {
        path
        for path in ROOT.rglob("*")
        if not any(part.startswith(".") or part == "__pycache__" for part in path.parts)
    }


# About 4 minutes on 2 cores: an end-to-end run like tests/test_erasure.py's (CI runs it)
@pytest.mark.slow
def test_notebook_runs_top_to_bottom_with_solutions(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    files_before = repository_files()
    execute(notebook, ROOT, tmp_path, monkeypatch)

    # Every check cell ran to its "Right" line
    outputs = [
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    ]
    assert sum(text.count("Right") for text in outputs) == 4

    # The trained deltas went to the temporary folder; nothing new in the repository
    assert list(tmp_path.glob("esd-course-*/esd-x.safetensors"))
    assert repository_files() == files_before


def test_student_copy_has_no_solutions_and_runs_to_the_first_exercise(tmp_path, monkeypatch):
    copy = write_student_copy(tmp_path / "student.ipynb")
    full = nbformat.read(NOTEBOOK, as_version=4)
    assert not [cell for cell in copy.cells if "solution" in tags(cell)]
    n_solutions = sum("solution" in tags(cell) for cell in full.cells)
    assert len(copy.cells) == len(full.cells) - n_solutions

    # Everything before the first exercise runs, from notebooks/ as Jupyter starts it there
    first = next(i for i, cell in enumerate(copy.cells) if "exercise" in tags(cell))
    copy.cells = copy.cells[:first]
    execute(copy, NOTEBOOK.parent, tmp_path, monkeypatch)


def test_student_copy_exercise_is_a_placeholder(tmp_path, monkeypatch):
    copy = write_student_copy(tmp_path / "student.ipynb")

    # The setup (the first two code cells), then exercise 1 as given and its check: the
    # placeholder raises
    setup = [cell for cell in copy.cells if cell.cell_type == "code"][:2]
    first = next(i for i, cell in enumerate(copy.cells) if "exercise" in tags(cell))
    exercise = copy.cells[first]
    check = copy.cells[first + 1]
    copy.cells = [*setup, exercise, check]
    with pytest.raises(CellExecutionError, match="NotImplementedError"):
        execute(copy, ROOT, tmp_path, monkeypatch)


def test_student_copy_refuses_to_overwrite_its_input(tmp_path):
    before = NOTEBOOK.read_bytes()
    command = [sys.executable, str(STUDENT_COPY), "--output", str(NOTEBOOK)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "input of this run" in done.stderr
    assert NOTEBOOK.read_bytes() == before
