"""Step distillation: students that sample in a few steps (``fewstep.*`` in a recipe).

:data:`STEP_OBJECTIVES` is the registry of step objectives (name -> :class:`~koala.distill.fewstep.base.StepObjective`
subclass), the way :data:`~koala.distill.hooks.FEATURE_TYPES` and :data:`~koala.distill.losses.FEATURE_LOSSES` are for
KD; ``fewstep.method`` names one. The :class:`~koala.distill.step.Distiller` builds it and its micro-step calls it.
"""

from __future__ import annotations

from .base import StepObjective
from .dmd import DMD
from .lcm import LCM

STEP_OBJECTIVES: dict[str, type[StepObjective]] = {"lcm": LCM, "dmd": DMD}


def make_objective(d) -> StepObjective | None:
    """The step objective ``d.cfg.fewstep.method`` names for the Distiller ``d`` (None for ``none``)."""
    method = d.cfg.fewstep.method
    return None if method == "none" else STEP_OBJECTIVES[method](d)


__all__ = ["STEP_OBJECTIVES", "StepObjective", "make_objective"]
