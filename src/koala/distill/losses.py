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
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # a step objective's own terms (e.g. lcm)

    def scalars(self, pairs: list[FeaturePair] = ()) -> dict[str, float]:
        """Loss totals and featKD per stage as floats, read from the device in one transfer (one sync)."""
        names = ["loss/total", "loss/task", "loss/out", "loss/feat"]
        values = [self.total.detach(), self.task, self.out, self.feat]
        stages: dict[str, list[torch.Tensor]] = {}
        for p in pairs:
            if p.name in self.per_pair:
                stages.setdefault(p.stage, []).append(self.per_pair[p.name])
        names += [f"feat/{k}" for k in stages] + [f"loss/{k}" for k in self.extra]
        values += [torch.stack(v).sum() for v in stages.values()] + [v.detach() for v in self.extra.values()]
        return dict(zip(names, torch.stack([v.float() for v in values]).tolist()))


def _mse_teacher_norm(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MSE divided by the teacher feature's mean square: every layer weighs the same whatever its scale."""
    return mse(s, t) / t.float().pow(2).mean().clamp_min(1e-8)


def _cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity along the channel axis (1 for [B, C, H, W] maps, last for [B, N, C] tokens),
    averaged over positions and the batch."""
    return (1 - F.cosine_similarity(s.float(), t.float(), dim=1 if s.ndim == 4 else -1, eps=1e-8)).mean()


# The feature-loss registry (``kd.feature_loss``): name -> loss(student feature, teacher feature) in fp32.
FEATURE_LOSSES = {"mse": mse, "mse_teacher_norm": _mse_teacher_norm, "cosine": _cosine}


def feature_losses(
    pairs: list[FeaturePair], s_feats: dict, t_feats: dict, loss: str = "mse"
) -> dict[str, torch.Tensor]:
    """One loss per feature pair (fp32), with the :data:`FEATURE_LOSSES` entry named ``loss``."""
    if loss not in FEATURE_LOSSES:
        raise KoalaError(f"kd.feature_loss {loss!r}: choose one of {', '.join(FEATURE_LOSSES)}")
    fn = FEATURE_LOSSES[loss]
    out = {}
    for p in pairs:
        if p.student not in s_feats or p.teacher not in t_feats:
            raise RuntimeError(
                f"feature {p.name} was not captured (student {p.student in s_feats}, "
                f"teacher {p.teacher in t_feats}); was the forward run inside capture()?"
            )
        s, t = s_feats[p.student], t_feats[p.teacher].detach()
        if s.shape != t.shape:
            raise KoalaError(
                f"feature {p.name}: student shape {tuple(s.shape)} != teacher {p.teacher} {tuple(t.shape)}"
            )
        out[p.name] = fn(s, t)
    return out


def kd_losses(
    student_out: torch.Tensor,
    target: torch.Tensor,
    teacher_out: torch.Tensor | None,
    pairs: list[FeaturePair],
    s_feats: dict,
    t_feats: dict,
    weights,
    feature_loss: str = "mse",
    prediction: torch.Tensor | None = None,
) -> Losses:
    """L_task on ``prediction`` (the part of the student's raw output the sampler uses; default: all of it, e.g. the
    epsilon half of a learned-sigma DiT's output), L_outKD on the whole raw outputs, L_featKD over ``pairs``;
    ``weights``: the λs as attributes ``task``, ``out``, ``feat`` (a :class:`~koala.distill.config.LossConfig`)."""
    zero = student_out.new_zeros((), dtype=torch.float32)
    task = mse(student_out if prediction is None else prediction, target)
    out = mse(student_out, teacher_out.detach()) if teacher_out is not None else zero
    per_pair = feature_losses(pairs, s_feats, t_feats, feature_loss) if pairs else {}
    feat = torch.stack(list(per_pair.values())).sum() if per_pair else zero
    total = weights.task * task + weights.out * out + weights.feat * feat
    return Losses(total, task.detach(), out.detach(), feat.detach(), {k: v.detach() for k, v in per_pair.items()})
