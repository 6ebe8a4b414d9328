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
import sysconfig
from pathlib import Path

import pytest
import yaml

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


def _drop_fences(md: str) -> str:
    """Directive fences removed with their bodies kept, code blocks removed whole (nesting followed)."""
    kept, stack = [], []
    for line in md.split("\n"):
        fence = re.match(r"^(`{3,})(\{[\w:-]+\})?([\w-]*)", line)
        if fence and stack and stack[-1][0] == fence.group(1) and not (fence.group(2) or fence.group(3)):
            stack.pop()  # a closing fence
            continue
        if fence:
            stack.append((fence.group(1), "directive" if fence.group(2) else "code"))
            continue
        if not any(kind == "code" for _, kind in stack):
            kept.append(line)
    return "\n".join(kept)


def _prose(md: str) -> str:
    """Markdown with everything that is not prose removed: code, math, roles, directive options,
    link targets and headings (directive bodies, e.g. theorem statements, stay: they are prose)."""
    md = _drop_fences(md)
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
    # prose between two directives is prose (it used to be dropped with them), code blocks are not
    between = "```{note}\nfirst\n```\n\nhand-typed 0.93 here\n\n```{tip}\nsecond\n```\n```python\nx = 7\n```"
    assert [m.group(0) for m in NUMBER.finditer(_prose(between))] == ["0.93"]


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


# ------------------------------------------------------------------------------------------------
# the first cell: Colab and other machines
# ------------------------------------------------------------------------------------------------

REPOSITORY_LINE = re.compile(r'^REPOSITORY = os\.environ\.get\("SKIPIT_REPOSITORY", "([^"]+)"\)', re.M)


def _first_code_cell(nb_path: Path) -> str:
    cells = json.loads(nb_path.read_text())["cells"]
    return next("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_first_cell_installs_from_the_configured_repository(nb_path: Path):
    src = _first_code_cell(nb_path)
    m = REPOSITORY_LINE.search(src)
    assert m, f"{nb_path.name}: the first code cell must set REPOSITORY (the install cell)"
    assert m.group(1) == _repository_url(), "the first cell's URL must be _config.yml's repository.url"
    assert '"pip", "install"' in src
    assert not re.search(r'"(-e|--editable)"|pip install -e', src), "install non-editably (no restart needed)"
    assert not re.search(r'"(torch|numpy)\b', src), "never pin or install torch/numpy (Colab keeps its own)"
    assert "SKIPIT_DATA" in src and "clone" in src


def _run_cells(sources: list[str], cwd: Path, kernel_name: str) -> list[str]:
    """Execute ``sources`` as one notebook in a fresh kernel; returns each cell's stdout."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=900,
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return ["".join(o.get("text", "") for o in c.outputs if o.get("output_type") == "stream") for c in nb.cells]


CHECK = """import os, skipit_core as sk
model, processor = sk.zoo.load_vlm("digits-llava")
print(sk.__file__)
print(os.environ["SKIPIT_DATA"])
print(type(model).__name__, sk.Backbone.of(model).n_layers)
"""


@pytest.mark.slow
def test_first_cell_on_a_fresh_machine(tmp_path: Path, monkeypatch):
    """A fresh kernel without skipit_core runs the first cell against a local clone URL, then imports
    the package and loads digits-llava in the same kernel (no restart). The kernel lives in a
    throwaway venv that sees the project venv's packages (torch, transformers ...) through a .pth file,
    so nothing is downloaded and the project's editable install is left alone."""
    venv = tmp_path / "venv"
    # without pip: its pip and setuptools are the project venv's too (ensurepip's setuptools is too old)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=600)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # a path line (not a site dir): the project venv's own .pth files, its editable skipit_core among them, stay unread
    (purelib / "skipit-project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    spec = tmp_path / "jupyter" / "kernels" / "fresh-venv"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(py), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh venv", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SKIPIT_REPOSITORY", ROOT.as_uri())  # the "remote": this repository's committed HEAD
    monkeypatch.delenv("SKIPIT_DATA", raising=False)
    # pip inside the kernel: no index, no dependencies (they come from the project venv), no build isolation
    # (pip reads PIP_NO_BUILD_ISOLATION=0 as "isolation off"), and no look at the project venv's skipit-core
    for k, v in dict(PIP_NO_INDEX="1", PIP_NO_DEPS="1", PIP_NO_BUILD_ISOLATION="0", PIP_IGNORE_INSTALLED="1",
                     PIP_DISABLE_PIP_VERSION_CHECK="1").items():
        monkeypatch.setenv(k, v)
    work = tmp_path / "content"
    work.mkdir()
    probe = "import importlib.util; print(importlib.util.find_spec('skipit_core'))"
    for nb_path in CHAPTERS[:1]:  # every chapter's first cell is the same (checked above)
        before, _, out = _run_cells([probe, _first_code_cell(nb_path), CHECK], work, "fresh-venv")
        assert before.strip() == "None", "the fresh kernel must start without skipit_core"
        module, data, model = out.strip().splitlines()
        assert Path(module).resolve().is_relative_to(venv.resolve()), f"imported {module}, not the venv's install"
        assert not Path(module).resolve().is_relative_to(ROOT / "src")
        assert Path(data) == work / "skipit-book" / "data"
        assert model.startswith("LlavaForConditionalGeneration")


@pytest.mark.slow
def test_first_cell_does_nothing_where_skipit_is_installed(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("SKIPIT_DATA", raising=False)
    monkeypatch.setenv("SKIPIT_REPOSITORY", "file:///nonexistent")  # would fail loudly if it cloned
    for nb_path in CHAPTERS:
        _, out = _run_cells([_first_code_cell(nb_path), "import os; print(os.environ.get('SKIPIT_DATA'))"],
                            tmp_path, "python3")
        assert out.strip() == "None"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# a course text: exercises with solutions, citations that resolve
# ------------------------------------------------------------------------------------------------

# {exercise} / {exercise-start} with their :label:, {solution} / {solution-start} with the exercise's label
EXERCISE = re.compile(r"^```+\{exercise(?:-start)?\}[^\n]*\n(?::[\w-]+:[^\n]*\n)*?:label:\s*(\S+)", re.M)
SOLUTION = re.compile(r"^```+\{solution(?:-start)?\}\s+(\S+)", re.M)
CITE = re.compile(r"\{cite(?::[\w]+)?\}`([^`]+)`")
BIB_KEY = re.compile(r"^@\w+\{\s*([^,\s]+)\s*,", re.M)


def _exercises(md: str) -> tuple[list[str], list[str]]:
    return EXERCISE.findall(md), SOLUTION.findall(md)


def test_exercise_checker_finds_labels_and_solutions():
    md = ("```{exercise} One\n:label: ex-a\n\nDo it.\n```\n"
          "````{solution-start} ex-a\n:class: dropdown\n````\n"
          "```{exercise-start} Two\n:class: x\n:label: ex-b\n```\n```{exercise-end}\n```\n"
          "```{solution} ex-b\n:class: dropdown\n```\n")
    assert _exercises(md) == (["ex-a", "ex-b"], ["ex-a", "ex-b"])


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_each_chapter_has_three_exercises_with_solutions(nb_path: Path):
    exercises, solutions = [], []
    for md in _markdown(nb_path):
        e, s = _exercises(md)
        exercises += e
        solutions += s
    assert len(exercises) >= 3, f"{nb_path.name}: {len(exercises)} exercises (at least 3, each with a :label:)"
    assert len(set(exercises)) == len(exercises), f"{nb_path.name}: duplicate exercise labels {exercises}"
    missing = [e for e in exercises if e not in solutions]
    assert not missing, f"{nb_path.name}: exercises without a solution: {missing}"
    orphans = [s for s in solutions if s not in exercises]
    assert not orphans, f"{nb_path.name}: solutions of unknown exercises: {orphans}"
    cells = json.loads(nb_path.read_text())["cells"]
    opened = closed = 0
    code_in = []  # executed code cells inside each gated solution
    for cell in cells:  # a gated solution's code runs in the notebook: its start and end must pair up
        if cell["cell_type"] == "markdown":
            src = "".join(cell["source"])
            for fence in re.findall(r"^```+\{(solution-start|solution-end)\}", src, re.M):
                if fence == "solution-start":
                    assert opened == closed, f"{nb_path.name}: solution-start inside another solution"
                    opened += 1
                    code_in.append(0)
                else:
                    closed += 1
                    assert closed <= opened, f"{nb_path.name}: solution-end before its solution-start"
        elif opened > closed and "".join(cell["source"]).strip():
            assert cell.get("execution_count"), f"{nb_path.name}: a solution's code cell was not executed"
            code_in[-1] += 1
    assert opened == closed, f"{nb_path.name}: {opened} solution-start but {closed} solution-end"
    assert all(code_in), f"{nb_path.name}: a gated solution holds no code cell (its code must run in the chapter)"


def test_every_citation_is_in_the_bibliography():
    keys = set(BIB_KEY.findall((ROOT / "book" / "references.bib").read_text()))
    cited, unknown = set(), []
    for path in sorted((ROOT / "book").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.md")):
        for md in _markdown(path):
            for group in CITE.findall(md):
                for key in (k.strip() for k in group.split(",")):
                    cited.add(key)
                    if key not in keys:
                        unknown.append(f"{path.name}: {key}")
    assert cited, "no {cite} in the book"
    assert not unknown, "cited but not in book/references.bib:\n" + "\n".join(unknown)
    assert "hartman2026skipit" in cited
