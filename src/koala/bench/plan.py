"""`koala plan`: the memory a distillation recipe needs per device, before any weight is loaded.

State is counted from parameter counts: student weights (fp32 master), AdamW's two moments (fp32; about 1 byte
each with ``adamw8bit``), the EMA copy, the frozen teacher in ``teacher.dtype`` and the frozen text encoders and
VAE. The training step itself (teacher forward with the feature hooks, student forward, losses, backward: every
activation, saved tensor, feature buffer and gradient) is *run* on the ``meta`` device under a dispatch mode
that follows every tensor the step allocates and when it is freed, so its peak is counted, not guessed, at the
recipe's resolution, batch, features and gradient checkpointing. Attention is counted as a fused kernel
(flash / memory-efficient: output and logsumexp saved) unless ``train.attention=math``. Under
``train.mixed_precision`` the student
is simulated in the low-precision dtype and the fp32 gradients and the autocast weight copies are added.

Not counted: the CUDA context and the caching allocator's fragmentation (``fits`` keeps ``HEADROOM`` for them),
torch.compile's workspace, and data loader memory on the host.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..distill.config import DistillConfig
from ..errors import KoalaError
from ..utils.console import markdown_table
from ..utils.devices import parse_dtype
from ..utils.files import read_json
from .models import SDXL_VAE, TINY_PREFIX, preset_unet_config, real_text_encoder_factories
from .plan_fewstep import autocast_like

SCHEMA = "koala-plan/1"
HEADROOM = 0.10  # fraction of the device kept free for the CUDA context, allocator cache and fragmentation
GIB = 2**30


class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by the tensors allocated under the mode, and their peak. Works on ``meta`` (nothing is
    allocated). A storage counts from the op that creates it until its last tensor is freed; views and in-place
    results are not new storage."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key in self._sizes:
            return
        n = t.untyped_storage().nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """Memory-efficient attention (saves output + logsumexp, as flash / efficient / CPU-flash kernels do); on
    meta the plain SDPA call would take the math path, which materialises the attention matrix."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
    )[0]


@dataclass
class _Models:
    family: object
    teacher_config: dict
    student_config: dict
    frozen_params: dict  # component -> (parameter count, dtype)
    vae_scale: int


def _frozen_from_pipeline(fam, pipe: str, dtype: torch.dtype, vae_dtype) -> tuple[dict, int]:
    import transformers
    from diffusers import AutoencoderKL

    out = {}
    for _, enc_dir, cls in fam.text_encoders:
        cfg = transformers.AutoConfig.from_pretrained(os.path.join(pipe, enc_dir))
        with torch.device("meta"):
            m = getattr(transformers, cls)(cfg)
        out[enc_dir] = (sum(p.numel() for p in m.parameters()), dtype)
    vcfg = read_json(os.path.join(pipe, "vae", "config.json"))
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vcfg)
    vdt = vae_dtype or (torch.float32 if vcfg.get("force_upcast") else dtype)
    out["vae"] = (sum(p.numel() for p in vae.parameters()), vdt)
    return out, 2 ** (len(vcfg["block_out_channels"]) - 1)


def _frozen_from_preset(fam, tiny: bool, dtype: torch.dtype, vae_dtype) -> tuple[dict, int]:
    from diffusers import AutoencoderKL

    if tiny:
        from ..testing.tiny import RANDOM, tiny_text_encoders, tiny_vae

        encs, vae, scale = tiny_text_encoders(RANDOM, 1000, family=fam.name), tiny_vae(RANDOM), 2
    else:
        with torch.device("meta"):
            encs = [make() for make in real_text_encoder_factories(fam)]
            vae = AutoencoderKL(**SDXL_VAE)
        scale = 8
    out = {
        f"text_encoder{'_' + str(i + 1) if i else ''}": (sum(p.numel() for p in e.parameters()), dtype)
        for i, e in enumerate(encs)
    }
    out["vae"] = (sum(p.numel() for p in vae.parameters()), vae_dtype or torch.float32)  # SDXL VAE: force_upcast
    return out, scale


def _models(cfg: DistillConfig, teacher: str | None) -> _Models:
    from ..families import family_of, model_config, model_dir

    dtype = parse_dtype(cfg.teacher.dtype)
    vae_dtype = parse_dtype(cfg.teacher.vae_dtype)
    source = teacher or cfg.teacher.pipeline
    if source and os.path.isdir(source):
        fam = family_of(source, cfg.teacher.family)
        unet_src = cfg.teacher.unet_path if not teacher and cfg.teacher.unet_path else source
        t_config = model_config(unet_src) if os.path.isdir(unet_src) else model_config(source)
        frozen, scale = _frozen_from_pipeline(fam, source, dtype, vae_dtype)
    else:
        if not source:
            raise KoalaError(
                "no teacher to plan for: set teacher.pipeline (a pipeline directory) in the recipe or as an "
                "override, or run `koala plan --teacher PRESET` (e.g. sdxl-base; no weights needed)"
            )
        try:
            fam, t_config = preset_unet_config(source)
        except KoalaError:
            hint = (
                "; for a single-file teacher give the preset of its architecture (--teacher sdxl-base)"
                if os.path.isfile(source)
                else ""
            )
            raise KoalaError(
                f"teacher {source!r} is neither a pipeline directory nor a preset (e.g. sdxl-base, "
                f"sd-v1; tiny-<preset> for test sizes){hint}",
                option="teacher",
            ) from None
        frozen, scale = _frozen_from_preset(fam, source.startswith(TINY_PREFIX), dtype, vae_dtype)
    s = cfg.student
    if s.path and not os.path.isdir(s.path):
        raise KoalaError(
            f"student.path {s.path}: no such folder to read the student's architecture from; plan the "
            f"student.preset architecture ({s.preset}) with student.path=null, or point student.path at the "
            "compressed student",
            option="student.path",
        )
    s_config = model_config(model_dir(s.path)) if s.path else fam.student_config(t_config, s.preset)
    return _Models(fam, t_config, s_config, frozen, scale)


def simulate_step(cfg: DistillConfig, models: _Models) -> dict:
    """Run one KD micro-step (teacher forward, student forward, losses, backward) on meta; returns the peak bytes
    of what it allocates and the parameter counts."""
    from ..distill.hooks import FeatureRecorder, feature_pairs
    from ..distill.losses import kd_losses
    from ..distill.models import init_selection

    tcfg, fam = cfg.train, models.family
    mp = tcfg.mixed_precision
    sim_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    t_dtype = parse_dtype(cfg.teacher.dtype)
    teacher = fam.build_model(models.teacher_config, "meta").to(t_dtype).requires_grad_(False).eval()
    student = fam.build_model(models.student_config, "meta").to(sim_dtype).train()
    if tcfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    lmap = fam.build_layer_map(teacher, student, init_selection(cfg))
    pairs = feature_pairs(lmap, student, teacher, cfg.kd.features, cfg.kd.layer_selection, fam)
    w = cfg.loss
    if not w.feat > 0:
        pairs = []
    need_teacher = w.out > 0 or bool(pairs)
    s_rec = FeatureRecorder(student, [p.student for p in pairs], "student")
    t_rec = FeatureRecorder(teacher, [p.teacher for p in pairs], "teacher")
    b, lat = tcfg.batch_size, tcfg.resolution // models.vae_scale
    c = models.teacher_config["in_channels"]
    tracker = LiveTensorBytes()
    from unittest import mock

    attention = (
        mock.patch("torch.nn.functional.scaled_dot_product_attention", _fused_sdpa)
        if tcfg.attention != "math"
        else contextlib.nullcontext()
    )
    try:
        with tracker, attention:
            noisy = torch.empty(b, c, lat, lat, device="meta")
            target = torch.empty_like(noisy)
            t = torch.zeros(b, dtype=torch.long, device="meta")
            cond = fam.dummy_cond(models.teacher_config, b, device="meta")
            t_out = None
            if need_teacher:
                with torch.no_grad(), t_rec.capture():
                    t_out = fam.forward(teacher, noisy, t, cond, dtype=t_dtype)
            # the student's forward and backward (which recomputes under gradient checkpointing) as autocast runs them
            with autocast_like() if sim_dtype != torch.float32 else contextlib.nullcontext():
                with s_rec.capture():
                    s_out = fam.forward(student, noisy, t, cond)
                losses = kd_losses(
                    s_out,
                    target,
                    t_out if w.out > 0 else None,
                    pairs,
                    s_rec.pop(),
                    t_rec.pop(),
                    w,
                    cfg.kd.feature_loss,
                    prediction=fam.prediction(s_out, c),
                )
                losses.total.backward()
            del losses, s_out, t_out
    finally:
        s_rec.remove()
        t_rec.remove()
    return {
        "peak_bytes": tracker.peak,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "feature_pairs": len(pairs),
        "need_teacher": need_teacher,
        "sim_dtype": str(sim_dtype).replace("torch.", ""),
    }


def _simulate_fewstep(cfg: DistillConfig, models: _Models) -> dict:
    """:func:`koala.bench.plan_fewstep.simulate_fewstep` under the step's tracker and attention patch."""
    from unittest import mock

    from .plan_fewstep import simulate_fewstep

    attention = (
        mock.patch("torch.nn.functional.scaled_dot_product_attention", _fused_sdpa)
        if cfg.train.attention != "math"
        else contextlib.nullcontext()
    )
    return simulate_fewstep(cfg, models, LiveTensorBytes(), attention)


def _state_and_step(cfg: DistillConfig, models: _Models, processes: int) -> tuple[dict, dict, dict]:
    """``(simulation, state bytes, step bytes)``: the parts held for the whole run and the step's peak, for the KD
    step or (``fewstep.method``) the step objective's."""
    tcfg = cfg.train
    fewstep = cfg.fewstep.method != "none"
    sim = _simulate_fewstep(cfg, models) if fewstep else simulate_step(cfg, models)
    if fewstep:
        sim["student_params"] = sim["params"]["student"]
    p_s, p_t = sim["student_params"], sim["teacher_params"]
    p_train = (sim["params"]["lora"] or p_s) if fewstep else p_s  # LoRA mode: only the adapters train
    t_bytes = torch.empty((), dtype=parse_dtype(cfg.teacher.dtype)).element_size()
    mixed = tcfg.mixed_precision in ("bf16", "fp16")
    # AdamW: two fp32 moments; 8-bit AdamW: two 1-byte moments; CAME: one fp32 moment (its second moment and
    # confidence are factored into row/column vectors of each matrix, negligible next to it)
    opt_bytes = p_train * {"adamw": 8, "adamw8bit": 2, "came": 4}[tcfg.optimizer]
    fsdp = tcfg.fsdp if processes > 1 else "none"
    n = processes if (tcfg.shard_optimizer or fsdp != "none") else 1

    def shard(nbytes: int) -> int:
        return -(-nbytes // n)

    weights = 4 * (p_s + (sim["params"]["lora"] if fewstep else 0))
    # FSDP (koala.distill.sharding): grad_op shards the optimizer states, the EMA copy and the fp32 gradients;
    # full shards the weights too (one block's weights are gathered at a time: not counted)
    state = {
        "student_weights": shard(weights) if fsdp == "full" else weights,
        "optimizer_states": shard(opt_bytes),
        "ema": (shard(weights) if fsdp != "none" else weights) if tcfg.ema.enabled else 0,
        # a step objective's Distiller keeps the big teacher on the device even when no loss reads it
        "teacher_weights": p_t * t_bytes if sim["need_teacher"] or fewstep else 0,
        "frozen_encoders_vae": sum(
            n * torch.empty((), dtype=dt).element_size() for n, dt in models.frozen_params.values()
        ),
    }
    grads = 4 * p_train if fsdp == "none" else shard(4 * p_train)
    if fewstep:
        from .plan_fewstep import fewstep_bytes

        extra, phases = fewstep_bytes(cfg, sim["params"], sim["phases"], mixed)
        state.update(extra)
        sim["phase_bytes"] = phases
        step = max(phases.values())
    else:
        # the simulated step holds gradients in the simulation dtype; mixed precision keeps fp32 gradients and
        # autocast keeps a low-precision copy of each weight for the backward
        step = sim["peak_bytes"] + (4 * p_s if mixed else 0)
        step -= 4 * p_s - grads  # sharded fp32 gradients (reduce-scattered unit by unit during backward)
    # after backward: fp32 gradients, plus one fp32 temporary per parameter in a non-fused (foreach) AdamW step
    opt_step = grads + (0 if tcfg.fused_optimizer or tcfg.optimizer == "adamw8bit" else grads)
    return sim, state, {"step_activations_and_grads": step, "optimizer_step": opt_step}


def plan_memory(
    cfg: DistillConfig, teacher: str | None = None, device_gib: float | None = None, processes: int = 1
) -> dict:
    """Per-device memory of training ``cfg`` (a :func:`koala.distill.load_config` config); ``teacher``: a preset
    or pipeline directory instead of ``teacher.pipeline``; ``processes``: data-parallel processes (with
    ``train.shard_optimizer`` each keeps 1/N of the optimizer states; with ``train.fsdp`` also of the gradients
    and EMA, and with ``full`` of the weights). With ``fewstep.method`` the step objective's models are separate
    parts (:mod:`koala.bench.plan_fewstep`) and the plan has a ``fewstep`` entry. Returns the JSON-ready plan."""
    if processes < 1:
        raise KoalaError("processes must be >= 1", option="processes")
    tcfg = cfg.train
    models = _models(cfg, teacher)
    sim, state, step = _state_and_step(cfg, models, processes)
    total = sum(state.values()) + max(step.values())
    plan = {
        "schema": SCHEMA,
        "teacher": teacher or cfg.teacher.pipeline,
        "student": cfg.student.path or cfg.student.preset,
        "family": models.family.name,
        "resolution": tcfg.resolution,
        "batch_size": tcfg.batch_size,
        "latent": [
            tcfg.batch_size,
            models.teacher_config["in_channels"],
            tcfg.resolution // models.vae_scale,
            tcfg.resolution // models.vae_scale,
        ],
        "processes": processes,
        "switches": {
            k: getattr(tcfg, k)
            for k in (
                "mixed_precision",
                "gradient_checkpointing",
                "optimizer",
                "fused_optimizer",
                "shard_optimizer",
                "fsdp",
            )
        }
        | {"teacher_dtype": cfg.teacher.dtype, "ema": tcfg.ema.enabled},
        "params": {
            "student": sim["student_params"],
            "teacher": sim["teacher_params"],
            **{k: n for k, (n, _) in models.frozen_params.items()},
        },
        "feature_pairs": sim["feature_pairs"],
        "bytes": {**state, **step, "total": total},
        "headroom": HEADROOM,
    }
    if cfg.fewstep.method != "none":
        _add_fewstep(plan, cfg, sim, processes)
    if device_gib is not None:
        usable = device_gib * GIB * (1 - HEADROOM)
        plan["device_gib"] = device_gib
        plan["fits"] = total <= usable
        plan["margin_gib"] = (usable - total) / GIB
        if "fewstep" in plan:
            f = plan["fewstep"]["fsdp_estimate"]
            f["fits"] = {mode: f[mode] <= usable for mode in ("grad_op", "full")}
    return plan


def _add_fewstep(plan: dict, cfg: DistillConfig, sim: dict, processes: int) -> None:
    """The plan's ``fewstep`` entry: the method, the objective's parameter counts, each simulated phase's peak and
    what ``train.fsdp`` would need per device (over ``processes``, 8 when planning one)."""
    from .plan_fewstep import fsdp_estimate, plan_notes

    f, opt = cfg.fewstep, {"adamw": 8, "adamw8bit": 2, "came": 4}[cfg.train.optimizer]
    plan["fewstep"] = {
        "method": f.method,
        "teacher": f.teacher,
        "lora_rank": f.lora_rank,
        "params": sim["params"],
        "phases": sim["phase_bytes"],
        "fsdp_estimate": fsdp_estimate(
            plan["bytes"], sim["params"], opt, cfg.train.ema.enabled, processes if processes > 1 else 8
        ),
        "notes": plan_notes(cfg),
    }


FEWSTEP_ROWS = (
    ("step_teacher", "step teacher (frozen copy, {teacher_dtype})"),
    ("lcm_target", "LCM target network (fp32 EMA copy)"),
    ("fake_score", "DMD fake score (fp32, trained)"),
    ("fake_optimizer_states", "DMD fake score + GAN head AdamW states"),
    ("gan_head", "DMD GAN head (fp32)"),
)
PHASE_LABELS = {
    "student": "LCM step: student fwd+bwd, guided teacher at 2x batch, target fwd (peak)",
    "generator": "DMD generator update: rollout, fwd+bwd, fake + guided real score (peak)",
    "fake_score_update": "DMD fake-score update: fwd+bwd, AdamW step (peak)",
}


def _fewstep_rows(plan: dict) -> list[tuple[str, int]]:
    """The step objective's parts (those it holds) and its phases' peaks, as table rows."""
    if "fewstep" not in plan:
        return []
    b, td = plan["bytes"], plan["switches"]["teacher_dtype"]
    rows = [(label.format(teacher_dtype=td), b[k]) for k, label in FEWSTEP_ROWS if b.get(k)]
    return rows + [(PHASE_LABELS[k], v) for k, v in plan["fewstep"]["phases"].items()]


def _fsdp_lines(plan: dict) -> list[str]:
    """With a fewstep plan that does not fit: what train.fsdp would need per device (not supported yet)."""
    if "fewstep" not in plan or plan["fits"]:
        return []
    f = plan["fewstep"]["fsdp_estimate"]
    fit = {m: "fits" if f["fits"][m] else "does not fit" for m in ("grad_op", "full")}
    return [
        f"with train.fsdp over {f['processes']} processes it would need {f['grad_op'] / GIB:.2f} GiB per device "
        f"(grad_op: {fit['grad_op']}) or {f['full'] / GIB:.2f} GiB (full: {fit['full']}), but "
        f"fewstep.method={plan['fewstep']['method']} refuses train.fsdp for now (an estimate for when it is supported)"
    ]


def plan_markdown(plan: dict) -> str:
    b = plan["bytes"]
    sw, n = plan["switches"], plan["processes"]
    fsdp = sw.get("fsdp", "none") if n > 1 else "none"
    part = f", 1/{n} per process"
    shard = part if (sw["shard_optimizer"] or fsdp != "none") and n > 1 else ""
    rows = [
        ("student weights (fp32)" + (part if fsdp == "full" else ""), b["student_weights"]),
        (f"optimizer states{shard}", b["optimizer_states"]),
        ("EMA" + (part if fsdp != "none" else ""), b["ema"]),
        (f"teacher ({plan['switches']['teacher_dtype']})", b["teacher_weights"]),
        ("text encoders + VAE", b["frozen_encoders_vae"]),
        *_fewstep_rows(plan),
        ("step: activations, features, gradients (peak)", b["step_activations_and_grads"]),
        ("total", b["total"]),
    ]
    lines = [
        f"Memory plan: {plan['teacher']} -> {plan['student']} ({plan['family']}), {plan['resolution']}px x "
        f"batch {plan['batch_size']}, " + ", ".join(f"{k}={v}" for k, v in plan["switches"].items()),
        "",
        markdown_table(["part", "GiB"], [[name, f"{v / GIB:.2f}"] for name, v in rows]),
    ]
    if "fits" in plan:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines += [
            "",
            f"{verdict} a {plan['device_gib']:g} GiB device ({100 * plan['headroom']:.0f}% kept for the CUDA "
            f"context and allocator; margin {plan['margin_gib']:+.2f} GiB)",
        ]
        lines += _fsdp_lines(plan)
        if not plan["fits"]:
            sw = plan["switches"]
            tips = [
                tip
                for cond, tip in (
                    (not sw["gradient_checkpointing"], "train.gradient_checkpointing=true"),
                    (plan["batch_size"] > 1, "a smaller train.batch_size with a larger train.grad_accum"),
                    (sw["mixed_precision"] == "no", "train.mixed_precision=bf16"),
                    (sw["optimizer"] != "adamw8bit", "train.optimizer=adamw8bit"),
                    (
                        sw.get("fsdp", "none") == "none" and "fewstep" not in plan,  # refused: see _fsdp_lines
                        "train.fsdp=grad_op over several processes (ZeRO-2: gradients, "
                        "optimizer states and EMA sharded; train.fsdp=full shards the weights too)",
                    ),
                    (sw["teacher_dtype"] in ("fp32", "float32"), "teacher.dtype=bf16"),
                    (sw["ema"], "train.ema.enabled=false (or keep EMA on another device)"),
                )
                if cond
            ]
            lines.append("to fit, try: " + "; ".join(tips or ["a device with more memory"]))
    return "\n".join(lines) + "\n"
