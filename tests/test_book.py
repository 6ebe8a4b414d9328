"""The book: every chapter executes with small parameters, and the site builds offline.

Chapters are executed by papermill into a temporary folder (the committed notebooks, with their
outputs, are what `make book` writes); then Jupyter Book 1 builds the committed notebooks with
warnings as errors, as `make book` does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))
# Parameters that keep each chapter to seconds on a CPU; a chapter ignores names it does not define.
SMALL = {"n_samples": 16, "batch_size": 8, "n_eval": 48, "quick": True}

pytestmark = pytest.mark.book


def _parameters(nb_path: Path) -> set[str]:
    nb = json.loads(nb_path.read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"])
            return {line.split("=")[0].strip() for line in src.splitlines() if "=" in line and not line.startswith("#")}
    return set()


def test_every_chapter_has_a_parameters_cell():
    assert CHAPTERS, "no chapters under book/"
    for nb in CHAPTERS:
        assert _parameters(nb), f"{nb.name} has no cell tagged 'parameters'"


def test_committed_chapters_are_executed_without_errors():
    for nb_path in CHAPTERS:
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
        assert all(c.get("execution_count") for c in code), f"{nb_path.name} has unexecuted cells: run `make book`"
        errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{nb_path.name} was committed with an error output"


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_executes(nb_path: Path, tmp_path: Path):
    papermill = pytest.importorskip("papermill")
    params = {k: v for k, v in SMALL.items() if k in _parameters(nb_path)}
    papermill.execute_notebook(str(nb_path), str(tmp_path / nb_path.name), parameters=params,
                               cwd=str(nb_path.parent), kernel_name="python3", progress_bar=False)


def test_site_builds(tmp_path: Path):
    jb = Path(sys.executable).with_name("jupyter-book")
    if not jb.exists():
        pytest.skip("jupyter-book is not installed (install the `book` extra)")
    mathjax = ROOT / ".cache" / "mathjax" / "node_modules" / "mathjax" / "es5" / "tex-chtml.js"
    if not mathjax.exists():
        pytest.fail("MathJax is not installed under .cache/mathjax (the site serves it itself): run `make mathjax`")
    site = tmp_path / "site"
    shutil.copytree(ROOT / "book", site / "book")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, site / name)
    (site / ".cache").symlink_to(ROOT / ".cache")
    result = subprocess.run([str(jb), "build", str(site), "--warningiserror", "--keep-going"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    intro = (site / "_build" / "html" / "book" / "intro.html").read_text()
    assert "skip layers" in intro
    assert "_static/mathjax/es5/tex-chtml.js" in intro and "cdn.jsdelivr.net/npm/mathjax" not in intro
    assert (site / "_build" / "html" / "_static" / "mathjax" / "es5" / "output" / "chtml" / "fonts").is_dir()
    for nb in CHAPTERS:
        assert (site / "_build" / "html" / "book" / f"{nb.stem}.html").exists()
