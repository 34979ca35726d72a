"""KOALA's objective: L = λ_task·L_task + λ_out·L_outKD + λ_feat·L_featKD (paper Sec. 3.1.2, App. A.5).

All losses are computed in fp32, whatever the autocast / weight dtype of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import KoalaError
from .hooks import FeaturePair


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net should predict, per the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise KoalaError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float(), reduction="mean")


@dataclass
class Losses:
    total: torch.Tensor
    task: torch.Tensor
    out: torch.Tensor
    feat: torch.Tensor
    per_pair: dict[str, torch.Tensor] = field(default_factory=dict)

    def per_stage(self, pairs: list[FeaturePair]) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in pairs:
            if p.name in self.per_pair:
                out[p.stage] = out.get(p.stage, 0.0) + float(self.per_pair[p.name])
        return out

    def scalars(self, pairs: list[FeaturePair] = ()) -> dict[str, float]:
        logs = {"loss/total": float(self.total.detach()), "loss/task": float(self.task), "loss/out": float(self.out),
                "loss/feat": float(self.feat)}
        logs.update({f"feat/{k}": v for k, v in self.per_stage(list(pairs)).items()})
        return logs


def feature_losses(pairs: list[FeaturePair], s_feats: dict, t_feats: dict, normalize: str = "none") -> dict[str, torch.Tensor]:
    """MSE per feature pair (fp32). ``normalize="teacher"`` divides by the teacher feature's mean square."""
    out = {}
    for p in pairs:
        if p.student not in s_feats or p.teacher not in t_feats:
            raise RuntimeError(f"feature {p.name} was not captured (student {p.student in s_feats}, "
                               f"teacher {p.teacher in t_feats}); was the forward run inside capture()?")
        s, t = s_feats[p.student], t_feats[p.teacher].detach()
        if s.shape != t.shape:
            raise KoalaError(f"feature {p.name}: student shape {tuple(s.shape)} != teacher {p.teacher} {tuple(t.shape)}")
        loss = mse(s, t)
        if normalize == "teacher":
            loss = loss / t.float().pow(2).mean().clamp_min(1e-8)
        out[p.name] = loss
    return out


def kd_losses(student_out: torch.Tensor, target: torch.Tensor, teacher_out: torch.Tensor | None,
              pairs: list[FeaturePair], s_feats: dict, t_feats: dict, weights: dict, normalize: str = "none") -> Losses:
    zero = student_out.new_zeros((), dtype=torch.float32)
    task = mse(student_out, target)
    out = mse(student_out, teacher_out.detach()) if teacher_out is not None else zero
    per_pair = feature_losses(pairs, s_feats, t_feats, normalize) if pairs else {}
    feat = torch.stack(list(per_pair.values())).sum() if per_pair else zero
    total = weights["task"] * task + weights["out"] * out + weights["feat"] * feat
    return Losses(total, task.detach(), out.detach(), feat.detach(), {k: v.detach() for k, v in per_pair.items()})
