"""Where skipit's files live: the bottom of the import graph (imports nothing from skipit_core but errors).

``data_dir()`` is the project's ``data/`` folder (bundled models in ``data/models/<name>``, the frozen
DigitScenes test split in ``data/digitscenes/test.{npz,jsonl}``): ``$SKIPIT_DATA`` if set, else the
``data/`` next to ``src/`` of an editable install.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SkipitError

__all__ = ["ENV", "data_dir", "models_dir"]

ENV = "SKIPIT_DATA"
REPO_DATA = Path(__file__).resolve().parents[2] / "data"  # src/skipit_core/paths.py -> <repo>/data


def data_dir() -> Path:
    """The project's ``data/`` folder: ``$SKIPIT_DATA`` if set, else the repository's ``data/`` next to
    ``src/`` (editable install). Raises :class:`SkipitError` saying how to get it when neither exists."""
    env = os.environ.get(ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise SkipitError(f"${ENV}={env} is not a folder; point it at the skipit repository's data/ folder.")
        return p
    if REPO_DATA.is_dir():
        return REPO_DATA
    raise SkipitError(
        "cannot find skipit's data/ folder (models and frozen test split). Clone the repository "
        "(git clone ... && pip install -e .) so data/ sits next to src/, or set "
        f"{ENV}=/path/to/skipit/data, or pass path= explicitly."
    )


def models_dir() -> Path:
    """``data_dir() / "models"``: one folder per bundled model."""
    return data_dir() / "models"
