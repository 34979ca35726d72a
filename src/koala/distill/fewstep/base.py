"""What every step objective shares: the discrete noise schedule on the device, the step teacher, classifier-free
guidance on the step teacher, and the hooks a :class:`~koala.distill.step.Distiller` calls.

A step objective trains the student to sample in ``fewstep.steps`` steps. :class:`StepObjective` is the seam: the
Distiller builds one from the registry (:data:`koala.distill.fewstep.STEP_OBJECTIVES`) and calls
:meth:`~StepObjective.setup_student` before its optimizer exists (LoRA adapters go on here),
:meth:`~StepObjective.ready` once the student is placed and wrapped, :meth:`~StepObjective.losses` in its one
micro-step, :meth:`~StepObjective.after_update` after each optimizer update, and the checkpoint code
:meth:`~StepObjective.state_dict` / :meth:`~StepObjective.load_state_dict` (tensors and numbers only) and
:meth:`~StepObjective.save_model`.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING

import torch

from ...errors import KoalaError
from ...utils.attention import attention_context
from ...utils.weights import ENTRY_BYTES, tensor_bytes
from ..items import KDItem
from ..losses import Losses
from .lora import add_lora, check_family, load_lora_state, lora_state, save_lora_file, save_merged

if TYPE_CHECKING:
    from ...families.sampling import SamplingDefaults


class NoiseSchedule:
    """The discrete DDPM schedule (``alphas_cumprod`` of the teacher's noise scheduler) on a device: noising and the
    conversion of a denoiser's prediction (epsilon, v or sample) to ``(x0, eps)``."""

    def __init__(self, scheduler, device):
        ac = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.alpha, self.sigma = ac.sqrt(), (1 - ac).sqrt()
        self.kind = scheduler.config.prediction_type
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        if self.kind not in ("epsilon", "v_prediction", "sample"):
            raise KoalaError(
                f"scheduler prediction_type {self.kind!r} is not supported (epsilon, v_prediction, sample)"
            )

    def coefficients(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1, *[1] * (ndim - 1))
        return self.alpha[t].view(shape), self.sigma[t].view(shape)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t, x0.ndim)
        return a * x0 + s * eps

    def x0_eps(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` implied by the prediction ``pred`` of a denoiser at ``x``, timestep ``t`` (fp32)."""
        a, s = self.coefficients(t, x.ndim)
        pred, x = pred.float(), x.float()
        if self.kind == "epsilon":
            return (x - s * pred) / a, pred
        if self.kind == "v_prediction":
            return a * x - s * pred, s * x + a * pred
        return pred, (x - a * pred) / s.clamp_min(1e-8)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser predicts at ``add_noise(x0, eps, t)`` (its task-loss target)."""
        if self.kind == "epsilon":
            return eps
        a, s = self.coefficients(t, x0.ndim)
        return a * eps - s * x0 if self.kind == "v_prediction" else x0


def batch_cat(*conds: dict) -> dict:
    """Conditioning dicts concatenated along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class StepObjective:
    """The base of a step objective (see the module docstring). ``d``: the Distiller it trains for."""

    name = ""

    def __init__(self, d):
        self.d, self.cfg = d, d.cfg.fewstep
        self.family = d.family
        self.schedule = NoiseSchedule(d.frozen.noise_scheduler, d.acc.device)
        self.lora = int(self.cfg.lora_rank) > 0
        self.step_teacher = None
        self.uncond = None

    # ------------------------------------------------------------------ setup
    def setup_student(self, student: torch.nn.Module) -> None:
        """Before the optimizer: the step teacher (a frozen copy of the initial student, the big teacher or a
        folder), then LoRA adapters on the student in LoRA mode (only they train)."""
        self.step_teacher = self._load_step_teacher(student)
        if self.lora:
            check_family(self.family)
            add_lora(student, self.cfg.lora_rank, self.cfg.lora_alpha)
        self.uncond = self.family.uncond(self.d.frozen.parts) if self.d.frozen.parts is not None else None

    def _load_step_teacher(self, student):
        d, which = self.d, self.cfg.teacher
        if which == "teacher":
            return d.teacher
        if which == "student":
            model = copy.deepcopy(student)
        else:
            model = self._teacher_from_folder(which)
        model = model.to(d.acc.device, d.frozen.weight_dtype, memory_format=d.memory_format)
        return model.requires_grad_(False).eval()

    def _teacher_from_folder(self, path: str):
        from ...families import family_of, model_dir

        if not os.path.isdir(path):
            raise KoalaError(
                f"fewstep.teacher {path}: not 'student', 'teacher' or a denoiser folder; give one of them",
                option="fewstep.teacher",
            )
        folder = model_dir(path)
        fam = family_of(folder)
        if fam.name != self.family.name:
            raise KoalaError(
                f"fewstep.teacher {path} is a {fam.name} denoiser but the student is {self.family.name}; the step "
                f"teacher must be of the teacher's family",
                option="fewstep.teacher",
            )
        return fam.load_model(folder, torch.float32)

    def ready(self) -> None:
        """After the student is placed and wrapped (target networks copy it here)."""

    # ------------------------------------------------------------------ forwards
    def student_out(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The student's raw prediction (autocast per ``train.mixed_precision``), no feature capture."""
        d = self.d
        with d.acc.autocast(), attention_context(d.attention):
            out = self.family.forward(d.student, x, t, cond)
        return self.family.prediction(out, x.shape[1])

    @torch.no_grad()
    def frozen_out(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict, dtype=None) -> torch.Tensor:
        with attention_context(self.d.attention):
            out = self.family.forward(model, x, t, cond, dtype=dtype)
        return self.family.prediction(out, x.shape[1]).float()

    def uncond_like(self, cond: dict) -> dict:
        """``cond`` with every sample's text conditioning replaced by the unconditional one."""
        drop = torch.ones(next(iter(cond.values())).shape[0], dtype=torch.bool, device=self.d.acc.device)
        return self.family.drop_captions(cond, drop, self.uncond)

    @torch.no_grad()
    def guided(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict, scale: float, dtype=None) -> torch.Tensor:
        """``model``'s prediction with classifier-free guidance ``scale`` (standard form: uncond + scale x (cond -
        uncond); 1 = the conditional prediction alone), cond and uncond in one batch."""
        if scale == 1.0:
            return self.frozen_out(model, x, t, cond, dtype)
        both = self.frozen_out(model, torch.cat([x, x]), torch.cat([t, t]), batch_cat(cond, self.uncond_like(cond)))
        c, u = both.chunk(2)
        return u + scale * (c - u)

    def teacher_dtype(self):
        return self.d.frozen.weight_dtype

    # ------------------------------------------------------------------ the step
    def losses(self, item: KDItem) -> Losses:
        raise NotImplementedError

    def with_kd(self, item: KDItem, objective: torch.Tensor, extra: dict[str, torch.Tensor]) -> Losses:
        """The objective's loss plus the KD terms (``loss.task`` / ``loss.out`` / ``loss.feat``) on the item's own
        noised batch when any of their weights is above 0 (one-stage: KD alongside the step objective)."""
        d, w = self.d, self.d.cfg.loss
        extra = {k: v.detach() for k, v in extra.items()}
        if w.task > 0 or w.out > 0 or (w.feat > 0 and d.pairs):
            p = item.prepared
            kd = d.losses(p, d.student_forward(p), item.teacher_out, item.teacher_feats)
            return Losses(objective + kd.total, kd.task, kd.out, kd.feat, kd.per_pair, extra)
        zero = objective.new_zeros(())
        return Losses(objective, zero, zero, zero, {}, extra)

    def after_update(self, step: int) -> dict[str, float]:
        """After optimizer update ``step + 1`` (target networks follow the student here). Returns logs."""
        return {}

    # ------------------------------------------------------------------ what a student records and saves
    def sampling(self) -> "SamplingDefaults":
        """How the trained student samples: recorded in its layer map (``meta.sampling``) for koala generate."""
        raise NotImplementedError

    def save_model(self, student, folder: str) -> bool:
        """Write the student into ``folder`` when the objective owns its format (LoRA mode: the merged weights,
        plus the LoRA file next to it); False: the checkpoint saves it as usual."""
        if not self.lora:
            return False
        save_merged(student, folder)
        save_lora_file(student, self.family, os.path.dirname(folder.rstrip(os.sep)))
        return True

    def state_dict(self) -> dict:
        """Tensors and numbers to resume from (``trainer_state.pt``'s ``fewstep`` entry)."""
        return {"lora": lora_state(self.d.plain_student)} if self.lora else {}

    def state_bytes(self) -> int:
        """About the bytes :meth:`state_dict` writes into a checkpoint (the free-space estimate), without copying."""
        return tensor_bytes(lora_state(self.d.plain_student), ENTRY_BYTES) if self.lora else 0

    def load_state_dict(self, state: dict) -> None:
        if self.lora:
            load_lora_state(self.d.plain_student, state["lora"])

    def close(self) -> None:
        pass
