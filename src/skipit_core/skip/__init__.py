"""Skipping that really removes work: whole layers, vision freeze, Late Entry, Early Exit.

    from skipit_core.skip import SkipPlan, skipping
    plan = SkipPlan.late_entry(2) | SkipPlan.early_exit(10)
    with skipping(model, plan):
        out = model.generate(**inputs, max_new_tokens=8)

:mod:`.plan` describes plans (immutable, validated, composable); :mod:`.runtime` applies them to a live
model (layer wrappers, gathered rows, KV-cache ledger) and restores the model exactly on exit.
"""

from __future__ import annotations

from .plan import LayerMode, SkipPlan, Work
from .runtime import Session, SkipLayer, active_session, skipping

__all__ = ["SkipPlan", "LayerMode", "Work", "skipping", "Session", "SkipLayer", "active_session"]
