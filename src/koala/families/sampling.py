"""How a student is sampled, by the kind of teacher it was distilled from (paper App. A.3).

The paper samples every model with the Euler discrete scheduler, 10 steps, guidance 3.5. The timestep spacing
follows the teacher: students of step-distilled teachers (SDXL-Turbo, SDXL-Lightning; the official KOALA-Turbo /
KOALA-Lightning usage) use ``trailing`` spacing; students of a base teacher keep the teacher pipeline's own
spacing (SDXL-Base: ``leading``). ``teacher.kind`` in a recipe (``koala compress --teacher-kind``) is recorded in
the student's layer map (``meta.teacher_kind``); ``koala compress`` writes the matching scheduler config into a
student pipeline, and ``koala generate`` / training-time validation read it.
"""

from __future__ import annotations

from ..errors import KoalaError

TEACHER_KINDS = ("base", "turbo", "lightning")
SPACING = {"base": None, "turbo": "trailing", "lightning": "trailing"}  # None: the pipeline's own spacing


def check_kind(kind: str, option: str = "teacher.kind") -> str:
    if kind not in TEACHER_KINDS:
        raise KoalaError(
            f"{option} {kind!r}: choose one of {', '.join(TEACHER_KINDS)} (base: SDXL-Base and other "
            "non-step-distilled teachers; turbo: SDXL-Turbo; lightning: SDXL-Lightning)",
            option=option,
        )
    return kind


def spacing_for(kind: str | None, scheduler_config: dict) -> str:
    """The timestep spacing to sample a student of a ``kind`` teacher with (None kind: the config's own)."""
    own = scheduler_config.get("timestep_spacing", "leading")
    return (SPACING.get(kind) if kind else None) or own


def sampling_scheduler(scheduler_config: dict, kind: str | None = None):
    """An ``EulerDiscreteScheduler`` from a pipeline's scheduler config (same betas and prediction type) with the
    spacing for ``kind``: how the paper samples every model."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(
        dict(scheduler_config), timestep_spacing=spacing_for(kind, dict(scheduler_config))
    )


def teacher_kind_of(model_dir: str) -> str | None:
    """``meta.teacher_kind`` of the layer map next to a student's config (a model dir, or a pipeline dir's unet/ or
    transformer/); None when there is no layer map or it does not say."""
    from ..arch.layer_map import LayerMap

    path = LayerMap.find(model_dir)
    return LayerMap.load(path).meta.get("teacher_kind") if path else None
