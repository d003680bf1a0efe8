"""student_copy.py: the students' copy of the course notebook, without the solutions.

    python notebooks/student_copy.py           # writes notebooks/esd_course_student.ipynb
    python notebooks/student_copy.py --output class.ipynb

Drops every cell tagged `solution` (Jupyter cell tags), so each `exercise` cell keeps its
placeholder; clears outputs and execution counts, so no answer shows in a printed result.
Refuses to overwrite its input; bad input is one line on stderr and exit code 2.
"""

import sys
from pathlib import Path

import nbformat

# The repository's scripts sit one folder up: cli.py parses the flags and gives the exit codes,
# files.py writes the copy atomically
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import files  # noqa: E402

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "esd_course.ipynb"
STUDENT = HERE / "esd_course_student.ipynb"
SOLUTION_TAG = "solution"


def is_solution(cell):
    """Whether a notebook cell carries the `solution` tag."""
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def student_copy(notebook):
    """A copy of `notebook` (nbformat) without its solution cells and outputs."""
    copy = nbformat.from_dict(notebook)
    copy.cells = [cell for cell in copy.cells if not is_solution(cell)]
    for cell in copy.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return copy


def read(path):
    """The notebook at `path`, or LoadError: one line that says why not."""
    try:
        return nbformat.read(path, as_version=4)
    except Exception as e:  # no such file, not JSON, not a notebook: whatever nbformat raises
        raise files.LoadError(f"cannot read notebook {path}: {files.first_line(e)}") from None


def main(argv=None):
    parser = cli.ArgumentParser(description="Write the course notebook's copy without solutions.")
    parser.add_argument("--input", default=str(NOTEBOOK), help="the teacher's notebook")
    parser.add_argument("--output", default=str(STUDENT), help="the students' copy to write")
    args = parser.parse_args(argv)

    def work():
        files.check_output(args.output, inputs=[args.input])
        notebook = read(args.input)
        copy = student_copy(notebook)
        files.atomic_write(args.output, lambda tmp: nbformat.write(copy, tmp))

        dropped = len(notebook.cells) - len(copy.cells)
        print(f"wrote {args.output}: {len(copy.cells)} cells, {dropped} solution cells left out")

    return cli.run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
