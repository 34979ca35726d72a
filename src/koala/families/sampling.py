"""How a student is sampled: its recorded sampling defaults, else the paper's by the kind of its teacher (App. A.3).

The paper samples every model with the Euler discrete scheduler, 10 steps, guidance 3.5. The timestep spacing
follows the teacher: students of step-distilled teachers (SDXL-Turbo, SDXL-Lightning; the official KOALA-Turbo /
KOALA-Lightning usage) use ``trailing`` spacing; students of a base teacher keep the teacher pipeline's own
spacing (SDXL-Base: ``leading``). ``teacher.kind`` in a recipe (``koala compress --teacher-kind``) is recorded in
the student's layer map (``meta.teacher_kind``); ``koala compress`` writes the matching scheduler config into a
student pipeline, and ``koala generate`` / training-time validation read it.

A student that is sampled otherwise (a few-step LCM / DMD student: ``LCMScheduler``, 4 steps, guidance 1.0, maybe
explicit timesteps) records how in its layer map: ``meta.sampling``, a :class:`SamplingDefaults` written with
:func:`record_sampling`. :func:`sampling_defaults_of` reads it back (or derives the paper's defaults when there is
no record), and ``koala generate``, ``koala eval run``, ``koala app``, ``koala bench`` and the model card use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..errors import KoalaError

TEACHER_KINDS = ("base", "turbo", "lightning")
SPACING = {"base": None, "turbo": "trailing", "lightning": "trailing"}  # None: the pipeline's own spacing
SPACINGS = ("leading", "trailing", "linspace")  # diffusers' timestep_spacing values
NUM_TRAIN_TIMESTEPS = 1000  # SDXL's, SD-1.x's and PixArt's schedulers (the default of a record's check)
FIX = "write the record again with koala.families.sampling.record_sampling"


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


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model is sampled unless the user says otherwise (the paper's defaults when nothing is recorded).

    ``scheduler``: a diffusers scheduler class name, built from the pipeline's own scheduler config (same betas
    and prediction type) with ``scheduler_config``'s overrides applied (e.g. ``{"timestep_spacing": "trailing"}``).
    ``steps``: denoising steps. ``guidance_scale``: classifier-free guidance (1.0 or less: the pipeline runs no
    unconditional pass). ``timesteps``: explicit timesteps, strictly decreasing, one per step (e.g. DMD2's
    ``[999, 749, 499, 249]``); None: the scheduler's own for ``steps``. Values are checked on construction.
    """

    scheduler: str = "EulerDiscreteScheduler"
    scheduler_config: dict = field(default_factory=dict)
    steps: int = 10
    guidance_scale: float = 3.5
    timesteps: list[int] | None = None

    def __post_init__(self):
        _check({f.name: getattr(self, f.name) for f in fields(self)}, "SamplingDefaults")
        object.__setattr__(self, "scheduler_config", dict(self.scheduler_config))
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", [int(t) for t in self.timesteps])

    def to_meta(self) -> dict:
        """The JSON-ready record (the layer map's ``meta.sampling``)."""
        return {
            "scheduler": self.scheduler,
            "scheduler_config": dict(self.scheduler_config),
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "timesteps": None if self.timesteps is None else list(self.timesteps),
        }

    def build_scheduler(self, base_config: dict, extra: dict | None = None):
        """``(scheduler, overrides applied)``: the ``scheduler`` class from a pipeline's scheduler config
        ``base_config`` with ``scheduler_config`` (the keys the class takes) and then ``extra`` applied."""
        import inspect

        cls = check_scheduler_class(self.scheduler, "scheduler")
        accepted = inspect.signature(cls.__init__).parameters
        overrides = {k: v for k, v in self.scheduler_config.items() if k in accepted}
        overrides.update(extra or {})
        return cls.from_config(dict(base_config), **overrides), overrides

    @classmethod
    def from_meta(
        cls, d: dict, where: str = "meta.sampling", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    ) -> "SamplingDefaults":
        """The defaults a record ``d`` holds (keys left out take the paper's defaults). A bad record raises a
        :class:`KoalaError` that names ``where`` (the file and key) and the value at fault; timesteps must lie in
        ``[0, num_train_timesteps)`` (the scheduler config override's own count when it sets one)."""
        if not isinstance(d, dict):
            raise KoalaError(f"{where}: must be a JSON object with scheduler, steps, guidance_scale...; {FIX}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise KoalaError(
                f"{where}: unknown key(s) {', '.join(unknown)}; the keys are scheduler, scheduler_config, steps, "
                f"guidance_scale and timesteps; {FIX}",
                option=f"sampling.{unknown[0]}",
            )
        values = {**cls().to_meta(), **d}
        _check(values, where, num_train_timesteps)
        return cls(**values)


def _fail(where: str, key: str, message: str):
    raise KoalaError(f"{where}.{key}: {message}; {FIX}", option=f"sampling.{key}")


def _check(v: dict, where: str, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
    """Raise a :class:`KoalaError` naming ``where`` and the key for the first bad value of the record ``v``."""
    check_scheduler_class(v["scheduler"], f"{where}.scheduler")
    conf = v["scheduler_config"]
    if not isinstance(conf, dict) or not all(isinstance(k, str) for k in conf):
        _fail(where, "scheduler_config", f"{conf!r} is not a mapping of config keys to values")
    if conf.get("timestep_spacing", SPACINGS[0]) not in SPACINGS:
        _fail(
            where, "scheduler_config", f"timestep_spacing {conf['timestep_spacing']!r}: choose {', '.join(SPACINGS)}"
        )
    steps = v["steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        _fail(where, "steps", f"{steps!r}: the number of denoising steps must be an integer >= 1")
    g = v["guidance_scale"]
    if not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g) or g < 0:
        _fail(where, "guidance_scale", f"{g!r}: the guidance scale must be a number >= 0 (1.0: no CFG)")
    ts = v["timesteps"]
    if ts is None:
        return
    limit = conf.get("num_train_timesteps", num_train_timesteps)
    if not isinstance(ts, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ts):
        _fail(where, "timesteps", f"{ts!r}: give a list of integers (or null for the scheduler's own)")
    if any(not 0 <= t < limit for t in ts):
        _fail(where, "timesteps", f"{list(ts)}: every timestep must lie in [0, {limit})")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        _fail(where, "timesteps", f"{list(ts)}: timesteps must be strictly decreasing (e.g. [999, 749, 499, 249])")
    if len(ts) != steps:
        _fail(where, "timesteps", f"{len(ts)} timesteps for steps {steps}: give one timestep per step")


def check_scheduler_class(name, where: str = "scheduler"):
    """The diffusers scheduler class called ``name``; a :class:`KoalaError` naming ``where`` when there is none."""
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise KoalaError(
            f"{where}: {name!r} is not a diffusers scheduler class (e.g. EulerDiscreteScheduler, LCMScheduler; "
            f"one whose extra dependency is missing is not available either); {FIX}",
            option="sampling.scheduler",
        )
    return cls


def paper_defaults(teacher_kind: str | None = None) -> SamplingDefaults:
    """The paper's defaults (Euler, 10 steps, guidance 3.5) with the spacing for a ``teacher_kind`` teacher
    (trailing for turbo / lightning; otherwise the pipeline's own)."""
    spacing = SPACING.get(teacher_kind) if teacher_kind else None
    return SamplingDefaults(scheduler_config={"timestep_spacing": spacing} if spacing else {})


def defaults_from_meta(meta: dict, where: str = "koala_layer_map.json") -> SamplingDefaults:
    """The sampling defaults of a layer map's ``meta``: its ``sampling`` record, else the paper's for its
    ``teacher_kind`` (``where``: the file, for error messages)."""
    if "sampling" in meta:
        return SamplingDefaults.from_meta(meta["sampling"], f"{where}: meta.sampling")
    return paper_defaults(meta.get("teacher_kind"))


def record_sampling(meta: dict, defaults: SamplingDefaults) -> None:
    """Write ``defaults`` into a layer map's ``meta`` (``meta["sampling"]``; save the map to keep it)."""
    if not isinstance(defaults, SamplingDefaults):
        raise KoalaError(f"record_sampling: give a SamplingDefaults, not {type(defaults).__name__}")
    meta["sampling"] = defaults.to_meta()


def sampling_defaults_of(model_dir: str) -> SamplingDefaults:
    """How the model in ``model_dir`` (a student denoiser dir, or a pipeline dir) is sampled by default: the record
    in the layer map next to its config, else the paper's defaults with the spacing for its teacher kind; a model
    without a layer map (a plain teacher pipeline) gets the paper's defaults with its pipeline's own spacing."""
    from ..arch.layer_map import LayerMap

    path = LayerMap.find(model_dir)
    return defaults_from_meta(LayerMap.load(path).meta, path) if path else paper_defaults()
