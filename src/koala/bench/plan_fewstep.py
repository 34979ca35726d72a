"""`koala plan` for step distillation (``fewstep.method``: lcm | dmd): the models a step objective adds and its
micro-step, run on the ``meta`` device the way :func:`koala.bench.plan.simulate_step` runs the KD step.

What each objective holds besides the student and its optimizer (:mod:`koala.distill.fewstep`):

- the step teacher: a frozen copy of the student in ``teacher.dtype`` (``fewstep.teacher=student``), the big
  teacher itself (``teacher``: counted once, as the teacher) or a denoiser folder;
- ``lcm``: the target network, an fp32 copy of the student (``fewstep.target_decay`` > 0);
- ``dmd``: the fake score (a trainable fp32 copy of the step teacher) with its AdamW states, and the GAN head on its
  bottleneck (``fewstep.gan_weight`` > 0).

The micro-step is simulated phase by phase. ``lcm``: the student's forward (with gradient), the guided step
teacher at twice the batch and the target's forward (no gradient, while the student's activations are held), the
KD terms when a ``loss.*`` weight is on, backward. ``dmd``: one fake-score update (a generator sample without
gradient, the fake score's forward and backward, with the GAN head on the data latents too), then the generator's
update (one backward-simulation step without gradient, the step with gradient, the fake score's forward (through
its input when the GAN is on), the guided real score at twice the batch, backward). The step's peak is the larger
phase's. LoRA mode (``fewstep.lora_rank``) simulates the frozen student and adds the adapters' gradients from their
parameter count (their own activations, rank-sized, are not counted).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..distill.config import DistillConfig
from ..utils.devices import parse_dtype

FEWSTEP_KEYS = ("step_teacher", "lcm_target", "fake_score", "fake_optimizer_states", "gan_head")


def lora_params(model: torch.nn.Module, rank: int) -> int:
    """Parameters of rank-``rank`` adapters on the layers :data:`koala.distill.fewstep.lora.TARGETS` names (peft:
    a Linear gets ``rank x (in + out)``, a Conv2d a ``k x k`` down and a 1 x 1 up projection)."""
    from ..distill.fewstep.lora import TARGETS

    n = 0
    for name, m in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in TARGETS):
            continue
        if isinstance(m, torch.nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            n += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return n


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


class _Sim:
    """The meta models of a step objective and the forwards its phases run."""

    def __init__(self, cfg: DistillConfig, models, sim_dtype: torch.dtype):
        from ..families import model_config, model_dir

        self.cfg, self.f, self.fam = cfg, cfg.fewstep, models.family
        self.sim_dtype, self.t_dtype = sim_dtype, parse_dtype(cfg.teacher.dtype)
        self.c = models.teacher_config["in_channels"]
        build = self.fam.build_model
        self.teacher = build(models.teacher_config, "meta").to(self.t_dtype).requires_grad_(False).eval()
        self.student = build(models.student_config, "meta").to(sim_dtype).train()
        ckpt = cfg.train.gradient_checkpointing
        if ckpt:
            self.student.enable_gradient_checkpointing()
        self.lora = lora_params(self.student, self.f.lora_rank) if self.f.lora_rank > 0 else 0
        if self.lora:  # the base is frozen; the adapters' gradients are added from their count
            self.student.requires_grad_(False)
        which = self.f.teacher
        if which == "teacher":
            self.step_teacher = self.teacher
        else:
            folder = which not in ("student", "teacher") and os.path.isdir(which)
            config = model_config(model_dir(which)) if folder else models.student_config
            self.step_teacher = build(config, "meta").to(self.t_dtype).requires_grad_(False).eval()
        self.target = self.fake = self.head = None
        if self.f.method == "lcm" and self.f.target_decay > 0:  # no autocast in its forward: fp32 (frozen_out)
            self.target = build(models.student_config, "meta").requires_grad_(False).eval()
        if self.f.method == "dmd":
            self.fake = build(dict(self.step_teacher.config), "meta").to(sim_dtype).requires_grad_(False).train()
            if ckpt:
                self.fake.enable_gradient_checkpointing()
            if self.f.gan_weight > 0:
                self._hook_head()

    def _hook_head(self) -> None:
        from ..distill.fewstep.dmd import GANHead, bottleneck, feature_channels

        with torch.device("meta"):
            self.head = GANHead(feature_channels(self.fake)).to(self.sim_dtype)
        self.feat = None

        def keep(module, inputs, output):
            self.feat = output[0] if isinstance(output, tuple) else output

        bottleneck(self.fake).register_forward_hook(keep)

    def params(self) -> dict[str, int]:
        """Parameter counts: student, LoRA adapters, step teacher (0: the big teacher), target, fake, GAN head."""
        return {
            "student": _count(self.student),
            "lora": self.lora,
            "step_teacher": 0 if self.step_teacher is self.teacher else _count(self.step_teacher),
            "lcm_target": _count(self.target) + self.lora if self.target is not None else 0,
            "fake_score": _count(self.fake) if self.fake is not None else 0,
            "gan_head": _count(self.head) if self.head is not None else 0,
        }

    def student_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` for a student forward with gradient: in LoRA mode it requires grad, so the frozen base saves what
        the adapters' backward needs."""
        return x.detach().requires_grad_(True) if self.lora else x

    def out(self, model, x, t, cond, dtype=None) -> torch.Tensor:
        return self.fam.prediction(self.fam.forward(model, x, t, cond, dtype=dtype), self.c).float()

    def guided(self, x, t, cond) -> None:
        """The step teacher with classifier-free guidance: cond and uncond in one batch of 2b, no gradient."""
        with torch.no_grad():
            if self.f.guidance_scale == 1.0:
                self.out(self.step_teacher, x, t, cond, self.t_dtype)
            else:
                both = {k: torch.cat([v, v]) for k, v in cond.items()}
                self.out(self.step_teacher, torch.cat([x, x]), torch.cat([t, t]), both, self.t_dtype)


class _KDTerms:
    """The KD terms a step objective keeps when a ``loss.*`` weight is on (one stage): the teacher's forward under
    feature capture before the micro-step (its outputs held through it), the student's under capture, the losses."""

    def __init__(self, cfg: DistillConfig, sim: _Sim):
        from ..distill.hooks import FeatureRecorder, feature_pairs
        from ..distill.models import init_selection

        self.cfg, self.sim, w = cfg, sim, cfg.loss
        lmap = sim.fam.build_layer_map(sim.teacher, sim.student, init_selection(cfg))
        pairs = feature_pairs(lmap, sim.student, sim.teacher, cfg.kd.features, cfg.kd.layer_selection, sim.fam)
        self.pairs = pairs if w.feat > 0 else []
        self.need_teacher = w.out > 0 or bool(self.pairs)
        self.s_rec = FeatureRecorder(sim.student, [p.student for p in self.pairs], "student")
        self.t_rec = FeatureRecorder(sim.teacher, [p.teacher for p in self.pairs], "teacher")
        self.t_out, self.t_feats = None, {}

    def teacher_forward(self, x, t, cond) -> None:
        if self.need_teacher:
            with torch.no_grad(), self.t_rec.capture():
                self.t_out = self.sim.fam.forward(self.sim.teacher, x, t, cond, dtype=self.sim.t_dtype)
            self.t_feats = self.t_rec.pop()

    def loss(self, x, t, cond, autocast) -> torch.Tensor:
        from ..distill.losses import kd_losses

        sim, w = self.sim, self.cfg.loss
        with autocast():
            with self.s_rec.capture():
                s_out = sim.fam.forward(sim.student, sim.student_input(x), t, cond)
            losses = kd_losses(
                s_out,
                torch.empty_like(x),
                self.t_out if w.out > 0 else None,
                self.pairs,
                self.s_rec.pop(),
                self.t_feats,
                w,
                self.cfg.kd.feature_loss,
                prediction=sim.fam.prediction(s_out, sim.c),
            )
        return losses.total

    def remove(self) -> None:
        self.s_rec.remove()
        self.t_rec.remove()


def _lcm_phase(sim: _Sim, x, t, cond, autocast, kd: _KDTerms | None) -> None:
    """LCM's micro-step: student (grad), guided step teacher (2b), target (b), loss (+ KD), backward."""
    with autocast():
        online = sim.out(sim.student, sim.student_input(x), t, cond)
    sim.guided(x, t, cond)
    with torch.no_grad():
        sim.out(sim.target if sim.target is not None else sim.student, x, t, cond)
    loss = (online - x.float()).abs().mean()
    if kd is not None:
        loss = loss + kd.loss(x, t, cond, autocast)
    loss.backward()


def _dmd_fake_phase(sim: _Sim, x, t, cond, autocast) -> None:
    """One fake-score update: a generator sample (no grad), the fake score's denoising loss (+ the GAN head on the
    generator sample and on the noised data latents), backward; the gradients are dropped after the step."""
    with torch.no_grad(), autocast():
        sim.out(sim.student, x, t, cond)
    params = list(sim.fake.parameters()) + (list(sim.head.parameters()) if sim.head is not None else [])
    for q in params:
        q.requires_grad_(True)
    with autocast():
        loss = (sim.out(sim.fake, x, t, cond) - x.float()).pow(2).mean()
        if sim.head is not None:
            loss = loss + sim.head(sim.feat).mean()
            sim.out(sim.fake, x, t, cond)  # the data latents' features (the GAN head's real side)
            loss = loss + sim.head(sim.feat).mean()
            sim.feat = None
    loss.backward()
    for q in params:
        q.grad = None
        q.requires_grad_(False)


def _dmd_generator_phase(sim: _Sim, x, t, cond, autocast, kd: _KDTerms | None) -> None:
    """The generator's update: a backward-simulation step (no grad), the step with gradient, the fake score (through
    its input with the GAN), the guided real score (2b), the DMD loss (+ KD), backward."""
    with torch.no_grad(), autocast():
        sim.out(sim.student, x, t, cond)
    with autocast():
        x0 = sim.out(sim.student, sim.student_input(x), t, cond)
        loss = x0.pow(2).mean()
        if sim.head is not None:  # the frozen fake score's graph through its input, to the GAN head's logits
            sim.out(sim.fake, x0, t, cond)
            loss = loss + sim.head(sim.feat).mean()
            sim.feat = None
        else:
            with torch.no_grad():
                sim.out(sim.fake, x0.detach(), t, cond)
    sim.guided(x0.detach(), t, cond)
    if kd is not None:
        loss = loss + kd.loss(x, t, cond, autocast)
    loss.backward()


def simulate_fewstep(cfg: DistillConfig, models, tracker, attention) -> dict:
    """The step objective's micro-step on meta under ``tracker`` (a :class:`~koala.bench.plan.LiveTensorBytes`)
    and ``attention`` (the SDPA patch): the peak of each phase and the parameter counts."""

    tcfg, w = cfg.train, cfg.loss
    sim_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.mixed_precision, torch.float32)
    sim = _Sim(cfg, models, sim_dtype)
    b, lat = tcfg.batch_size, tcfg.resolution // models.vae_scale
    autocast = autocast_like if sim_dtype != torch.float32 else contextlib.nullcontext
    kd = _KDTerms(cfg, sim) if (w.task > 0 or w.out > 0 or w.feat > 0) else None
    phases = {}
    try:
        with tracker, attention:
            x = torch.empty(b, sim.c, lat, lat, device="meta")
            t = torch.zeros(b, dtype=torch.long, device="meta")
            cond = sim.fam.dummy_cond(models.teacher_config, b, device="meta")
            if kd is not None:
                kd.teacher_forward(x, t, cond)
            # each phase, backward included, under the autocast stand-in: a gradient-checkpointed recompute must
            # see the dtypes its forward saw
            with autocast():
                if sim.f.method == "dmd":
                    tracker.peak = tracker.live
                    _dmd_fake_phase(sim, x, t, cond, autocast)
                    phases["fake_score_update"] = tracker.peak
                    tracker.peak = tracker.live
                    _dmd_generator_phase(sim, x, t, cond, autocast, kd)
                    phases["generator"] = tracker.peak
                else:
                    _lcm_phase(sim, x, t, cond, autocast, kd)
                    phases["student"] = tracker.peak
    finally:
        if kd is not None:
            kd.remove()
    return {
        "phases": phases,
        "params": sim.params(),
        "teacher_params": _count(sim.teacher),
        "feature_pairs": len(kd.pairs) if kd is not None else 0,
        "need_teacher": kd is not None and kd.need_teacher,
        "sim_dtype": str(sim_dtype).replace("torch.", ""),
    }


def fewstep_bytes(cfg: DistillConfig, params: dict, phases: dict, mixed: bool) -> tuple[dict, dict]:
    """``(state, step phases)`` in bytes: what the objective's models hold, and each simulated phase's peak with
    what the simulation leaves out (mixed precision: fp32 gradients and autocast's low-precision weight copies;
    LoRA: the adapters' fp32 gradients; the fake score's foreach AdamW temporary)."""
    t_bytes = torch.empty((), dtype=parse_dtype(cfg.teacher.dtype)).element_size()
    p_s, p_l, p_f, p_h = params["student"], params["lora"], params["fake_score"], params["gan_head"]
    state = {
        "step_teacher": params["step_teacher"] * t_bytes,
        "lcm_target": 4 * params["lcm_target"],
        "fake_score": 4 * p_f,
        "fake_optimizer_states": 8 * (p_f + p_h),
        "gan_head": 4 * p_h,
    }
    # the simulated student holds weights and gradients in the simulation dtype (see plan_memory); LoRA: no weight
    # gradients in the simulation, fp32 ones for the adapters in training, and autocast's copies of every weight
    student_extra = (2 * p_s + 4 * p_l) if p_l and mixed else (4 * p_l if p_l else (4 * p_s if mixed else 0))
    out = {}
    for name, peak in phases.items():
        if name == "fake_score_update":  # fp32 gradients + a foreach AdamW temporary at the fake score's step
            out[name] = max(peak + (4 * p_f if mixed else 0), 8 * (p_f + p_h))
        else:
            gan_copies = 2 * p_f if (mixed and p_h and name == "generator") else 0  # saved through its input
            out[name] = peak + student_extra + gan_copies
    return state, out


def fsdp_estimate(bytes_: dict, params: dict, opt_per_param: int, ema: bool, n: int) -> dict:
    """Per-device bytes if step distillation ran under ``train.fsdp`` over ``n`` processes (it refuses it for now):
    grad_op shards the trainable models' gradients and optimizer states (student, fake score) and the EMA / target
    copies; full shards every denoiser's weights too (text encoders and VAE stay whole). Activations unchanged."""
    p_s = params["lora"] or params["student"]  # the trainable parameters
    whole = bytes_["frozen_encoders_vae"]

    def total(mode: str) -> int:
        def sh(x: int) -> int:
            return -(-x // n)

        weights = bytes_["student_weights"] + bytes_["teacher_weights"] + bytes_["step_teacher"] + bytes_["fake_score"]
        copies = bytes_["ema"] + bytes_["lcm_target"] + bytes_["gan_head"]
        states = opt_per_param * p_s + bytes_["fake_optimizer_states"]
        grads = 4 * p_s
        step = bytes_["step_activations_and_grads"] - grads + sh(grads)
        w = sh(weights) if mode == "full" else weights
        return w + sh(copies) + sh(states) + whole + max(step, sh(2 * grads))

    out = {"processes": n, "grad_op": total("grad_op"), "full": total("full"), "supported": False}
    out["note"] = (
        "fewstep.method refuses train.fsdp for now (koala.distill.config); an estimate for when it is supported "
        + ("(EMA sharded like the gradients)" if ema else "")
    ).strip()
    return out


def plan_notes(cfg: DistillConfig) -> list[str]:
    """What a reader of a fewstep plan should know."""
    notes = ["the big teacher stays on the device during step distillation (the Distiller places it), counted"]
    if cfg.fewstep.teacher not in ("student", "teacher") and not os.path.isdir(cfg.fewstep.teacher):
        notes.append(f"fewstep.teacher {cfg.fewstep.teacher}: not found, planned as the student's architecture")
    return notes


@contextlib.contextmanager
def autocast_like():
    """What autocast does to a low-precision model's saved tensors, on meta (where autocast does not run):
    linear and conv inputs cast to the weight dtype, group/layer norms computed and returned in fp32."""
    from unittest import mock

    import torch.nn.functional as F

    lin, conv, gn, ln = F.linear, F.conv2d, F.group_norm, F.layer_norm

    def f32(t):
        return None if t is None else t.float()

    def linear(x, w, b=None):
        return lin(x.to(w.dtype), w, b)

    def conv2d(x, w, b=None, *args, **kw):
        return conv(x.to(w.dtype), w, b, *args, **kw)

    def group_norm(x, groups, w=None, b=None, eps=1e-5):
        return gn(x.float(), groups, f32(w), f32(b), eps)

    def layer_norm(x, shape, w=None, b=None, eps=1e-5):
        return ln(x.float(), shape, f32(w), f32(b), eps)

    with mock.patch.multiple(F, linear=linear, conv2d=conv2d, group_norm=group_norm, layer_norm=layer_norm):
        yield
