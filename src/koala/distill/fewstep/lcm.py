"""``fewstep.method=lcm``: latent consistency distillation (Luo et al. 2023, arXiv 2310.04378; LCM-LoRA: 2311.05556).

The student becomes a consistency function along the step teacher's guided probability-flow ODE. Per sample: a
timestep ``t`` from the solver's grid of ``fewstep.ddim_steps`` points (skipping interval ``k``), its noisy latent
``x_t``; one DDIM step of the step teacher with classifier-free guidance (``fewstep.guidance_scale``, the guided
ODE the student learns, at a fixed w) from ``t`` to ``s = t - k``; then

    f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t)        (LCMScheduler's boundary scalings)
    loss    = d(f_student(x_t, t), f_target(x_s, s))      (Huber or L2; no gradient through the target)

with the target network an EMA of the student (``fewstep.target_decay``; 0: the student itself). The student is
then sampled with diffusers' ``LCMScheduler`` (``original_inference_steps`` = ``fewstep.ddim_steps``),
``fewstep.steps`` steps, guidance 1.
"""

from __future__ import annotations

import copy

import torch

from ...errors import KoalaError
from ...families.sampling import SamplingDefaults
from ...utils.weights import ENTRY_BYTES, tensor_bytes
from ..items import KDItem
from ..losses import Losses
from .base import StepObjective

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0  # LCMScheduler's default


def boundary_scalings(t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` at integer timesteps ``t``, as diffusers' LCMScheduler computes them: c_skip = 1 and
    c_out = 0 at t = 0, so f(x, 0) = x."""
    scaled = TIMESTEP_SCALING * t.float()
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    shape = (-1, *[1] * (ndim - 1))
    return c_skip.view(shape), c_out.view(shape)


def solver_grid(num_train_timesteps: int, ddim_steps: int) -> tuple[torch.Tensor, int]:
    """The DDIM solver's timesteps (ascending: k-1, 2k-1, ..., num_train_timesteps-1) and the skipping interval k;
    the same points LCMScheduler samples from with ``original_inference_steps = ddim_steps``."""
    if num_train_timesteps % ddim_steps:
        raise KoalaError(
            f"fewstep.ddim_steps {ddim_steps} does not divide the noise schedule's {num_train_timesteps} "
            f"timesteps; choose a divisor (e.g. 50)",
            option="fewstep.ddim_steps",
        )
    k = num_train_timesteps // ddim_steps
    return torch.arange(1, ddim_steps + 1) * k - 1, k


def huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber distance sqrt(|a - b|^2 + c^2) - c, per element, averaged (LCM's choice)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c**2) - c).mean()


class LCM(StepObjective):
    name = "lcm"

    def __init__(self, d):
        super().__init__(d)
        self.grid, self.k = solver_grid(self.schedule.num_train_timesteps, int(self.cfg.ddim_steps))
        self.grid = self.grid.to(d.acc.device)
        self.target = None  # the EMA target network (ready()); None: the online student without gradient

    def ready(self) -> None:
        if self.cfg.target_decay > 0:
            self.target = copy.deepcopy(self.d.plain_student).requires_grad_(False)

    # ------------------------------------------------------------------ pieces (tests check each)
    def draw(self, x0: torch.Tensor, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index into the grid, noise)`` per sample, from the sample's own generator."""
        idx = torch.stack([torch.randint(0, len(self.grid), (), generator=g) for g in gens]).to(x0.device)
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0.device)
        return idx, eps

    def solver_step(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: dict) -> torch.Tensor:
        """One DDIM step of the step teacher with guidance from ``t`` to ``s`` (no gradient)."""
        pred = self.guided(self.step_teacher, x, t, cond, self.cfg.guidance_scale, self.teacher_dtype())
        x0, eps = self.schedule.x0_eps(pred, x, t)
        a, sig = self.schedule.coefficients(s, x.ndim)
        return a * x0 + sig * eps

    def consistency(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip x + c_out x0_pred."""
        x0, _ = self.schedule.x0_eps(pred, x, t)
        c_skip, c_out = boundary_scalings(t, x.ndim)
        return c_skip * x.float() + c_out * x0

    @torch.no_grad()
    def target_value(self, x: torch.Tensor, s: torch.Tensor, cond: dict) -> torch.Tensor:
        model = self.target if self.target is not None else self.d.plain_student
        return self.consistency(self.frozen_out(model, x, s, cond), x, s)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.cfg.distance == "huber":
            return huber(a, b, self.cfg.huber_c)
        return torch.nn.functional.mse_loss(a.float(), b.float())

    # ------------------------------------------------------------------ the step
    def losses(self, item: KDItem) -> Losses:
        p = item.prepared
        x0, cond = p.latents, p.cond
        idx, eps = self.draw(x0, p.gens)
        t = self.grid[idx]
        s = (t - self.k).clamp_min(0)
        x_t = self.schedule.add_noise(x0, eps, t)
        online = self.consistency(self.student_out(x_t, t, cond), x_t, t)
        with torch.no_grad():
            x_s = self.solver_step(x_t, t, s, cond)
            target = self.target_value(x_s, s, cond)
        loss = self.distance(online, target)
        return self.with_kd(item, loss, {"lcm": loss})

    @torch.no_grad()
    def after_update(self, step: int) -> dict[str, float]:
        if self.target is not None:
            online = list(self.d.plain_student.parameters())
            pairs = [(t, o) for t, o in zip(self.target.parameters(), online) if o.requires_grad]
            torch._foreach_lerp_([t for t, _ in pairs], [o.detach() for _, o in pairs], 1.0 - self.cfg.target_decay)
        return {}

    # ------------------------------------------------------------------ record and resume
    def sampling(self) -> SamplingDefaults:
        return SamplingDefaults(
            "LCMScheduler",
            {"original_inference_steps": int(self.cfg.ddim_steps)},
            steps=int(self.cfg.steps),
            guidance_scale=1.0,
        )

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.target is not None:
            state["target"] = {
                n: t.detach().cpu().clone()
                for (n, t), o in zip(self.target.named_parameters(), self.d.plain_student.parameters())
                if o.requires_grad
            }
        return state

    def state_bytes(self) -> int:
        if self.target is None:
            return super().state_bytes()
        online = self.d.plain_student.parameters()
        trained = [t for t, o in zip(self.target.parameters(), online) if o.requires_grad]
        return super().state_bytes() + tensor_bytes(trained, ENTRY_BYTES)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.target is not None:
            # the frozen weights equal the student's (loaded already); the trained ones come from the state
            self.target.load_state_dict(self.d.plain_student.state_dict())
            params = dict(self.target.named_parameters())
            with torch.no_grad():
                for n, v in state["target"].items():
                    params[n].copy_(v)
