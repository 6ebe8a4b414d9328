"""The book: every chapter executes with small parameters, and the site builds offline.

Chapters are executed by papermill into a temporary folder (the committed notebooks, with their
outputs, are what `make book` writes); then Jupyter Book 1 builds the committed notebooks with
warnings as errors, as `make book` does.
"""

from __future__ import annotations

import ast
import json
import re
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


# ------------------------------------------------------------------------------------------------
# numbers in the prose come from the code: myst_nb.glue, pasted with {glue:text}
# ------------------------------------------------------------------------------------------------

GLUE_ROLE = re.compile(r"\{glue(?::(text|any|md|math))?\}`([^`]+)`")
GLUE_DIRECTIVE = re.compile(r"^```\{glue(?::(figure|any|math|md))?\}\s+(\S+)", re.M)
# a number standing alone in the prose (not part of a name such as LLaVA-1.5 or T5), with % or x
NUMBER = re.compile(r"(?<![\w.-])\d+(?:[.,]\d+)*(?:\s?%|x\b)?(?![\w-])")


def _prose(md: str) -> str:
    """Markdown with everything that is not prose removed: code, math, roles, directive options,
    link targets and headings (directive bodies, e.g. theorem statements, stay: they are prose)."""
    md = re.sub(r"^```\{[\w:-]+\}[^\n]*$", "", md, flags=re.M)      # directive fences: keep bodies
    md = re.sub(r"^```[\w-]*\n.*?^```\s*$", "", md, flags=re.S | re.M)  # code blocks
    md = re.sub(r"^```\s*$", "", md, flags=re.M)
    md = re.sub(r"^:[\w-]+:.*$", "", md, flags=re.M)                 # directive options
    md = re.sub(r"\$\$.*?\$\$", " ", md, flags=re.S)
    md = re.sub(r"\$[^$]+\$", " ", md)
    md = re.sub(r"\{[\w:-]+\}`[^`]*`", " ", md)                      # roles: glue, cite, ref, doc
    md = re.sub(r"`[^`]*`", " ", md)
    md = re.sub(r"\]\([^)]*\)", "]", md)
    md = re.sub(r"^#+ .*$", "", md, flags=re.M)
    return md


def _markdown(path: Path) -> list[str]:
    if path.suffix == ".ipynb":
        return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]
    return [path.read_text()]


def _glued(nb_path: Path) -> dict[str, dict]:
    """name -> mime bundle of every value glued in the committed notebook's outputs."""
    out = {}
    for cell in json.loads(nb_path.read_text())["cells"]:
        for o in cell.get("outputs", []):
            name = o.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                prefix = o["metadata"]["scrapbook"].get("mime_prefix", "")
                out[name] = {k[len(prefix):]: v for k, v in o.get("data", {}).items()}
    return out


def test_no_hand_typed_number_in_the_prose():
    """Every number a reader sees in the text of book/ is pasted from the code (glue), or is maths."""
    found = []
    for path in sorted((ROOT / "book").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.md")):
        for md in _markdown(path):
            text = _prose(md)
            found += [f"{path.name}: {m.group(0)!r} in ...{text[max(0, m.start() - 50):m.end() + 20]!r}..."
                      for m in NUMBER.finditer(text)]
    assert not found, "numbers typed by hand (glue them from the code):\n" + "\n".join(found)


def test_prose_checker_finds_hand_typed_numbers():
    assert [m.group(0) for m in NUMBER.finditer(_prose("accuracy 0.925 of 240, 12% and 1.3x"))] == \
        ["0.925", "240", "12%", "1.3x"]
    clean = "LLaVA-1.5-7B, T5, $0.9$, `n=240`, {glue:text}`acc:.3f`, [x](a/1.2.html)\n## Part 2\n:label: t-1"
    assert not NUMBER.search(_prose(clean))


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_glued_values_exist_in_the_same_chapter(nb_path: Path):
    glued = _glued(nb_path)
    problems = []
    for md in _markdown(nb_path):
        for kind, ref in GLUE_ROLE.findall(md):
            key, _, fmt = ref.partition(":")
            if "::" in ref:
                problems.append(f"{ref}: paste from this chapter only")
                continue
            if key not in glued:
                problems.append(f"{key}: not glued in {nb_path.name}")
                continue
            plain = glued[key].get("text/plain", "")
            try:
                value = ast.literal_eval(plain)
            except (ValueError, SyntaxError):
                problems.append(f"{key}: glued as {plain[:40]!r}, not a Python literal (glue float(x), int(x) or str)")
                continue
            if isinstance(value, float) and not fmt:
                problems.append(f"{key}: a float pasted without a format spec ({{glue:text}}`{key}:.3f`)")
        for kind, key in GLUE_DIRECTIVE.findall(md):
            if key not in glued:
                problems.append(f"{key}: not glued in {nb_path.name}")
            elif kind == "figure" and not any(k.startswith("image/") for k in glued[key]):
                problems.append(f"{key}: glue:figure of something that is not an image")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_key_results_are_checked_by_nbval(nb_path: Path):
    cells = json.loads(nb_path.read_text())["cells"]
    checked = [c for c in cells if "nbval-check-output" in c.get("metadata", {}).get("tags", [])]
    assert len(checked) >= 3, f"{nb_path.name}: tag the cells that print key results nbval-check-output"
    for c in checked:
        assert c["cell_type"] == "code" and c.get("outputs"), "a checked cell must be a code cell with outputs"
        assert "time_prefill" not in "".join(c["source"]), "timings are shown, never checked"
