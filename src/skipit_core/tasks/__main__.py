"""``python -m skipit_core.tasks [--freeze STEM]``: write the frozen DigitScenes test split."""

from .datasets import main

main()
