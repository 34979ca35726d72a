"""``fewstep.method=dmd``: distribution matching distillation in its DMD2 form (Yin et al. 2024, arXiv 2405.14867).

The student is a ``fewstep.steps``-step generator on fixed timesteps (trailing: 999, 749, 499, 249 for 1000 train
timesteps and 4 steps). At step ``i`` it maps ``x_{t_i}`` to its denoised latent, LCMScheduler's
``c_skip(t) x + c_out(t) x0_pred`` (:func:`~koala.distill.fewstep.lcm.boundary_scalings`: c_skip < 1e-7 at these
timesteps, so the x0 prediction, and exactly what the sampler computes), and the sampler re-noises it to ``t_{i+1}``
with fresh noise. Per generator update:

- backward simulation (DMD2 Sec. 4.5): per sample a step ``i`` from its own generator, pure noise run through
  steps ``0..i-1`` without gradient, then step ``i`` with gradient: ``x0_gen``;
- distribution matching: ``x0_gen`` noised to ``t`` in ``[min_t, max_t]`` of the schedule; the real score (the step
  teacher with classifier-free guidance ``fewstep.guidance_scale``) and the fake score each give an x0,

      grad = (p_fake - p_real) / mean(|x0_gen - p_real|)       (per sample, the paper's normalisation)
      loss = 0.5 * mse(x0_gen, (x0_gen - grad).detach())       (d loss / d x0_gen = grad / numel)

- the fake score (a copy of the step teacher in fp32 with its own AdamW, ``fewstep.fake_lr``) follows the generator:
  ``fewstep.fake_updates`` denoising updates per generator update (two time-scale rule), each on a fresh generator
  sample at ``t`` in ``[min_t, max_t]``, before the generator's loss (on the first micro-step of an update; its
  gradient clipped at ``train.max_grad_norm``, its learning rate constant);
- optional GAN (``fewstep.gan_weight`` > 0): a small classifier on the fake score's bottleneck features (its U-Net's
  mid block; the deepest down block when it has none, as KOALA-700M; a DiT's middle block), trained with the fake
  score on noised data latents (real) vs the generator samples of its denoising loss (fake), non-saturating
  softplus losses weighted ``fewstep.disc_weight`` (default 2 x gan_weight); the generator adds ``gan_weight x
  softplus(-D(fake))`` through the frozen fake score.

Everything random (step index, noises, timesteps) comes from each sample's own generator (``Prepared.gens``), and
the fake score, its optimizer and the GAN head are part of the checkpoint's state, so a resumed run is bit-exact.

The student is then sampled with diffusers' ``LCMScheduler`` on the same timesteps (``timesteps=`` in the pipeline
call), guidance 1.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F

from ...errors import KoalaError
from ...families.sampling import SamplingDefaults
from ...utils.attention import attention_context
from ...utils.weights import ENTRY_BYTES, tensor_bytes
from ..items import KDItem
from ..losses import Losses
from .base import StepObjective
from .lcm import boundary_scalings


def generator_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The generator's timesteps, descending, trailing-style as diffusers spaces them: ``round(T - i T / N) - 1``
    (999, 749, 499, 249 for T = 1000, N = 4)."""
    if not 1 <= steps <= num_train_timesteps:
        raise KoalaError(
            f"fewstep.steps {steps} does not fit the noise schedule's {num_train_timesteps} timesteps; choose 1 to "
            f"{num_train_timesteps} (e.g. 4)",
            option="fewstep.steps",
        )
    return [int(round(num_train_timesteps - i * num_train_timesteps / steps)) - 1 for i in range(steps)]


def dmd_loss(x0_gen: torch.Tensor, p_real: torch.Tensor, p_fake: torch.Tensor) -> torch.Tensor:
    """The distribution-matching loss of ``x0_gen`` given the real and fake scores' x0: its gradient wrt
    ``x0_gen`` is ``(p_fake - p_real) / mean(|x0_gen - p_real|) / numel`` (the normaliser per sample)."""
    with torch.no_grad():
        dims = tuple(range(1, x0_gen.ndim))
        norm = (x0_gen.detach().float() - p_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-12)
        grad = torch.nan_to_num((p_fake - p_real) / norm)
    return 0.5 * F.mse_loss(x0_gen.float(), (x0_gen.detach().float() - grad))


def bottleneck(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the denoiser's deepest features: a U-Net's mid block, its deepest down block when
    it has none (KOALA-700M), a DiT's middle transformer block."""
    mid = getattr(model, "mid_block", None)
    if mid is not None:
        return mid
    down = getattr(model, "down_blocks", None)
    if down is not None and len(down):
        return down[-1]
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is not None and len(blocks):
        return blocks[len(blocks) // 2]
    raise KoalaError(
        f"fewstep.gan_weight > 0: no bottleneck found in {type(model).__name__} (no mid block, down blocks or "
        "transformer blocks) for the GAN head; set fewstep.gan_weight=0",
        option="fewstep.gan_weight",
    )


def feature_channels(model: torch.nn.Module) -> int:
    c = model.config
    if "block_out_channels" in c:
        return int(c.block_out_channels[-1])
    return int(c.num_attention_heads * c.attention_head_dim)


class GANHead(torch.nn.Sequential):
    """The classifier on bottleneck features: two 3x3 convs (GroupNorm, SiLU), global average pool, a linear
    logit. Token features ``(B, N, C)`` of a DiT are read as a ``C x N x 1`` map."""

    def __init__(self, channels: int):
        nn, g = torch.nn, math.gcd(32, channels)
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(g, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(g, channels),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, 1),
        )

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        if feat.ndim == 3:
            feat = feat.transpose(1, 2).unsqueeze(-1)
        return super().forward(feat).float().squeeze(1)


def _randint(gens: list[torch.Generator], lo: int, hi: int, device) -> torch.Tensor:
    return torch.stack([torch.randint(lo, hi, (), generator=g) for g in gens]).to(device)


def _randn(gens: list[torch.Generator], shape, device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


class DMD(StepObjective):
    name = "dmd"

    def __init__(self, d):
        super().__init__(d)
        n = self.schedule.num_train_timesteps
        self.timesteps = torch.tensor(generator_timesteps(n, int(self.cfg.steps)), device=d.acc.device)
        self.t_lo, self.t_hi = int(self.cfg.min_t * n), min(int(self.cfg.max_t * n), n - 1)
        self.gan = self.cfg.gan_weight > 0
        self.disc_weight = self.cfg.disc_weight if self.cfg.disc_weight is not None else 2 * self.cfg.gan_weight
        self.fake = self.head = self.fake_opt = None
        self._feat, self._capture = None, False
        self._calls = 0  # losses() calls: the fake score updates on the first micro-step of each update
        self._logs: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ setup
    def setup_student(self, student: torch.nn.Module) -> None:
        """The step teacher and LoRA (base), then the fake score (a trainable fp32 copy of the step teacher), the
        GAN head on its bottleneck and their AdamW."""
        super().setup_student(student)
        d, t = self.d, self.d.cfg.train
        self.fake = copy.deepcopy(self.step_teacher).to(d.acc.device, torch.float32, memory_format=d.memory_format)
        self.fake.requires_grad_(False).train()  # trainable inside fit_fake only (see _trainable)
        if t.gradient_checkpointing:
            self.fake.enable_gradient_checkpointing()
        params = list(self.fake.parameters())
        if self.gan:
            bottleneck(self.fake).register_forward_hook(self._keep_feature)
            self.head = GANHead(feature_channels(self.fake)).to(d.acc.device).requires_grad_(False)
            params += list(self.head.parameters())
        lr = self.cfg.fake_lr if self.cfg.fake_lr is not None else t.lr
        self.fake_opt = torch.optim.AdamW(
            params, lr=lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay
        )

    def _keep_feature(self, module, inputs, output) -> None:
        if self._capture:
            self._feat = output[0] if isinstance(output, tuple) else output

    def _fake_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.fake_opt.param_groups for p in group["params"]]

    @contextlib.contextmanager
    def _trainable(self):
        """The fake score and GAN head take gradients inside this block only (their updates run forward and
        backward within it). Elsewhere they are frozen, so the generator's graph through them holds no parameter
        leaves, and a gradient-checkpointed recompute during the generator's backward saves what the forward
        saved."""
        params = self._fake_params()
        for q in params:
            q.requires_grad_(True)
        try:
            yield params
        finally:
            for q in params:
                q.requires_grad_(False)

    # ------------------------------------------------------------------ the generator
    def generator_x0(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The student's denoised latent at ``(x, t)``: ``c_skip x + c_out x0`` as LCMScheduler computes it."""
        x0, _ = self.schedule.x0_eps(self.student_out(x, t, cond), x, t)
        c_skip, c_out = boundary_scalings(t, x.ndim)
        return c_skip * x.float() + c_out * x0

    def draw_rollout(self, gens: list[torch.Generator], shape) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Per sample, from its own generator: the step index, the starting noise, one re-noise per earlier step."""
        dev = self.d.acc.device
        idx = _randint(gens, 0, len(self.timesteps), dev)
        start = _randn(gens, shape, dev)
        noises = [[torch.randn(shape, generator=g) for _ in range(int(i))] for g, i in zip(gens, idx)]
        return idx, start, noises

    @torch.no_grad()
    def simulate(self, start: torch.Tensor, idx: torch.Tensor, cond: dict, noises: list) -> torch.Tensor:
        """Backward simulation: each sample's latent at its step ``idx``, the generator run without gradient from
        ``start`` (pure noise) through steps ``0..idx-1``, re-noised to the next timestep with the sample's
        ``noises[k]`` after step ``k`` (LCMScheduler's multi-step sampling)."""
        x, b = start.float(), start.shape[0]
        for k in range(int(idx.max()) if b else 0):
            x0 = self.generator_x0(x, self.timesteps[k].expand(b), cond)
            noise = torch.stack([n[k] if k < len(n) else torch.zeros(x.shape[1:]) for n in noises])
            nxt = self.schedule.add_noise(x0, noise.to(x.device), self.timesteps[k + 1].expand(b))
            x = torch.where((idx > k).view(-1, *[1] * (x.ndim - 1)), nxt, x)
        return x

    def generate(self, gens: list[torch.Generator], shape, cond: dict) -> torch.Tensor:
        """A generator sample per item: backward simulation to a random step, then that step (with gradient when
        grad mode is on)."""
        idx, start, noises = self.draw_rollout(gens, shape)
        x = self.simulate(start, idx, cond, noises)
        return self.generator_x0(x, self.timesteps[idx], cond)

    # ------------------------------------------------------------------ the scores
    def fake_forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, feats: bool = False):
        """The fake score's prediction (fp32 weights, autocast per ``train.mixed_precision``) and, with ``feats``,
        its bottleneck features."""
        self._feat, self._capture = None, feats
        try:
            with self.d.acc.autocast(), attention_context(self.d.attention):
                out = self.family.forward(self.fake, x, t, cond, dtype=torch.float32)
        finally:
            self._capture = False
        feat, self._feat = self._feat, None
        return self.family.prediction(out, x.shape[1]).float(), feat

    def draw_t(self, gens: list[torch.Generator]) -> torch.Tensor:
        """A timestep in ``[min_t, max_t]`` of the schedule per sample."""
        return _randint(gens, self.t_lo, self.t_hi + 1, self.d.acc.device)

    def real_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The real score's x0: the step teacher with guidance ``fewstep.guidance_scale`` (no gradient)."""
        pred = self.guided(self.step_teacher, x_t, t, cond, self.cfg.guidance_scale, self.teacher_dtype())
        return self.schedule.x0_eps(pred, x_t, t)[0]

    # ------------------------------------------------------------------ the fake score's updates
    def fit_fake(self, item: KDItem) -> None:
        """``fewstep.fake_updates`` updates of the fake score (and GAN head), each on a fresh generator sample."""
        p = item.prepared
        for _ in range(int(self.cfg.fake_updates)):
            with torch.no_grad():
                x0 = self.generate(p.gens, p.latents.shape[1:], p.cond)
            t, eps = self.draw_t(p.gens), _randn(p.gens, x0.shape[1:], x0.device)
            x_t = self.schedule.add_noise(x0, eps, t)
            with self._trainable() as params:
                pred, feat = self.fake_forward(x_t, t, p.cond, feats=self.gan)
                fake = F.mse_loss(pred, self.schedule.target(x0, eps, t))
                total, logs = fake, {"loss/fake": fake}
                if self.gan:
                    disc = F.softplus(self.head(feat)).mean() + F.softplus(-self._real_logits(p)).mean()
                    total, logs["loss/disc"] = total + self.disc_weight * disc, disc
                self.fake_opt.zero_grad(set_to_none=True)
                with attention_context(self.d.attention):
                    total.backward()
                self._step_fake(params)
            for k, v in logs.items():
                self._logs.setdefault(k, []).append(v.detach())

    def _real_logits(self, p) -> torch.Tensor:
        """The GAN head on the fake score's features of the data latents, noised."""
        x0 = p.latents.float()
        t, eps = self.draw_t(p.gens), _randn(p.gens, x0.shape[1:], x0.device)
        return self.head(self.fake_forward(self.schedule.add_noise(x0, eps, t), t, p.cond, feats=True)[1])

    def _step_fake(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients over the processes (the fake score is not DDP-wrapped), clip, step."""
        acc = self.d.acc
        if acc.num_processes > 1:
            for q in params:
                if q.grad is not None:
                    torch.distributed.all_reduce(q.grad)
                    q.grad /= acc.num_processes
        max_norm = self.d.cfg.train.max_grad_norm
        if max_norm:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.fake_opt.step()
        self.fake_opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ the step
    def generator_terms(self, x0_gen: torch.Tensor, gens: list[torch.Generator], cond: dict) -> dict:
        """The generator's loss terms for its sample ``x0_gen``: ``dmd`` and (GAN on) ``gan``."""
        t, eps = self.draw_t(gens), _randn(gens, x0_gen.shape[1:], x0_gen.device)
        x_t = self.schedule.add_noise(x0_gen if self.gan else x0_gen.detach(), eps, t)
        with torch.set_grad_enabled(self.gan and torch.is_grad_enabled()):  # the fake score is frozen here
            pred, feat = self.fake_forward(x_t, t, cond, feats=self.gan)
            logits = self.head(feat) if self.gan else None
        x_t = x_t.detach()
        p_fake = self.schedule.x0_eps(pred.detach(), x_t, t)[0]
        terms = {"dmd": dmd_loss(x0_gen, self.real_x0(x_t, t, cond), p_fake)}
        if logits is not None:
            terms["gan"] = F.softplus(-logits).mean()
        return terms

    def losses(self, item: KDItem) -> Losses:
        p = item.prepared
        if self._calls % self.d.layout.grad_accum == 0:
            self.fit_fake(item)
        self._calls += 1
        x0_gen = self.generate(p.gens, p.latents.shape[1:], p.cond)
        terms = self.generator_terms(x0_gen, p.gens, p.cond)
        total = terms["dmd"] + (self.cfg.gan_weight * terms["gan"] if "gan" in terms else 0.0)
        return self.with_kd(item, total, terms)

    def after_update(self, step: int) -> dict[str, float]:
        logs = {k: float(torch.stack(v).float().mean()) for k, v in self._logs.items()}
        self._logs = {}
        return logs

    # ------------------------------------------------------------------ record and resume
    def sampling(self) -> SamplingDefaults:
        # custom timesteps: original_inference_steps = T puts every timestep on LCMScheduler's training grid (no
        # "unexpected results" warning; nothing else changes); no x0 clipping, as in training
        return SamplingDefaults(
            "LCMScheduler",
            {"original_inference_steps": self.schedule.num_train_timesteps, "clip_sample": False},
            steps=int(self.cfg.steps),
            guidance_scale=1.0,
            timesteps=[int(t) for t in self.timesteps],
        )

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["fake"] = {k: v.detach().cpu().clone() for k, v in self.fake.state_dict().items()}
        state["fake_opt"] = self.fake_opt.state_dict()
        if self.head is not None:
            state["head"] = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        return state

    def state_bytes(self) -> int:
        if self.fake is None:
            return super().state_bytes()
        moments = tensor_bytes([list(st.values()) for st in self.fake_opt.state.values()], ENTRY_BYTES)
        if not moments:  # before the first update: AdamW's two fp32 moments per trained parameter
            moments = sum(2 * p.numel() * 4 + 3 * ENTRY_BYTES for g in self.fake_opt.param_groups for p in g["params"])
        return (
            super().state_bytes()
            + tensor_bytes(self.fake, ENTRY_BYTES)
            + tensor_bytes(self.head, ENTRY_BYTES)
            + moments
        )

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "fake" not in state or ("head" in state) != (self.head is not None):
            raise KoalaError(
                "the checkpoint holds no DMD fake score or another GAN setting; resume with the run's "
                "fewstep.method and fewstep.gan_weight (0 or not)",
                option="train.resume",
            )
        self.fake.load_state_dict(state["fake"])
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        self.fake_opt.load_state_dict(state["fake_opt"])
