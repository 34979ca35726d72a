"""Time text encoders, U-Net steps and VAE decode of several models, interleaved, and report medians.

One *run* mirrors ``StableDiffusionXLPipeline``: encode the prompt batch with both text encoders, then
``steps`` Euler steps (U-Net on the CFG-doubled batch when ``cfg > 1``), then VAE decode. Each component is
timed with a device sync at its boundaries; the whole run is the end-to-end latency. Models are measured
in rounds A, B, A, B, ... so that background load (other processes on a shared CPU) hits all of them
alike; medians are reported.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from ..arch.stats import unet_flops
from ..errors import KoalaError
from ..utils import parse_dtype
from .memory import PeakMemory
from .models import BenchModel, build_bench_model, preset_unet_config

SCHEMA = "koala-bench/1"
COMPONENTS = ("text", "unet", "vae")


@dataclass
class BenchSettings:
    models: list[str]
    resolution: int = 1024
    steps: int = 10
    batch: int = 1
    cfg: float = 3.5
    device: str = "cuda"
    dtype: str = "fp16"
    components: list[str] = field(default_factory=lambda: list(COMPONENTS))
    warmup: int = 1
    repeats: int = 3
    keep_loaded: bool = True  # False: build each model anew every round (only one in memory at a time)
    text_len: int = 77

    def check(self) -> None:
        if not self.models:
            raise KoalaError("--models: give at least one preset name or pipeline directory")
        for name in self.models:  # fail before spending minutes building the earlier models
            if not os.path.isdir(name):
                preset_unet_config(name)
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or not self.components:
            raise KoalaError(f"--components: unknown {bad}; choose from {', '.join(COMPONENTS)} (comma separated)")
        if "unet" not in self.components:
            raise KoalaError("--components must include unet (its output feeds the VAE and the report)")
        if self.resolution % 64:
            raise KoalaError(f"--resolution {self.resolution} must be a multiple of 64")
        if self.steps < 1 or self.batch < 1 or self.repeats < 1 or self.warmup < 0:
            raise KoalaError("--steps, --batch and --repeats must be >= 1 and --warmup >= 0")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise KoalaError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
        if self.device == "cpu" and parse_dtype(self.dtype) == torch.float16:
            raise KoalaError("--dtype fp16 on --device cpu is very slow or unsupported; use fp32 or bf16 on CPU")

    @property
    def unet_batch(self) -> int:
        return self.batch * (2 if self.cfg > 1 else 1)

    @property
    def full(self) -> bool:
        return set(COMPONENTS) <= set(self.components)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Inputs:
    """Random inputs shaped like the pipeline's, fixed per model so every round does identical work."""

    def __init__(self, m: BenchModel, s: BenchSettings, device, dtype):
        c = m.unet.config
        g = torch.Generator().manual_seed(0)
        lat = s.resolution // m.vae_scale
        vocab = m.text_encoders[0].config.vocab_size if m.text_encoders else 1000
        self.ids = torch.randint(0, vocab, (s.batch, s.text_len), generator=g).to(device)
        pooled_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        self.ctx = torch.randn(s.unet_batch, s.text_len, c.cross_attention_dim, generator=g).to(device, dtype)
        self.pooled = torch.randn(s.unet_batch, pooled_dim, generator=g).to(device, dtype)
        size = [s.resolution, s.resolution, 0, 0, s.resolution, s.resolution]
        self.time_ids = torch.tensor([size] * s.unet_batch, dtype=dtype, device=device)
        self.latents = torch.randn(s.batch, c.in_channels, lat, lat, generator=g).to(device, dtype)


@torch.no_grad()
def _one_run(m: BenchModel, s: BenchSettings, x: _Inputs, device) -> dict:
    """One pipeline-shaped run; returns milliseconds per component and the list of U-Net step times."""
    from ..lab.tiny import sdxl_scheduler

    out: dict = {}
    _sync(device)
    t_start = time.perf_counter()
    ctx, pooled = x.ctx, x.pooled
    if "text" in s.components and m.text_encoders:
        t0 = time.perf_counter()
        hidden = []
        for enc in m.text_encoders:
            o = enc(x.ids, output_hidden_states=True)
            hidden.append(o.hidden_states[-2])
            if o[0].ndim == 2:
                pooled_t = o[0]
        _sync(device)
        out["text_encoders"] = 1000 * (time.perf_counter() - t0)
        if s.cfg > 1:  # zeroed negative prompt (force_zeros_for_empty_prompt), as SDXL does without one
            hidden = [torch.cat([torch.zeros_like(h), h]) for h in hidden]
            pooled_t = torch.cat([torch.zeros_like(pooled_t), pooled_t])
        ctx, pooled = torch.cat(hidden, dim=-1), pooled_t
        if ctx.shape[-1] != m.unet.config.cross_attention_dim:  # e.g. a U-Net-only custom model
            ctx = x.ctx
    sched = sdxl_scheduler()
    sched.set_timesteps(s.steps, device=device)
    latents = x.latents * sched.init_noise_sigma
    steps_ms = []
    added = {"text_embeds": pooled, "time_ids": x.time_ids}
    for t in sched.timesteps:
        t0 = time.perf_counter()
        inp = torch.cat([latents] * 2) if s.cfg > 1 else latents
        inp = sched.scale_model_input(inp, t)
        eps = m.unet(inp, t, encoder_hidden_states=ctx, added_cond_kwargs=added, return_dict=False)[0]
        if s.cfg > 1:
            uncond, cond = eps.chunk(2)
            eps = uncond + s.cfg * (cond - uncond)
        latents = sched.step(eps, t, latents, return_dict=False)[0]
        _sync(device)
        steps_ms.append(1000 * (time.perf_counter() - t0))
    out["unet_steps"] = steps_ms
    out["unet_total"] = sum(steps_ms)
    if "vae" in s.components and m.vae is not None:
        t0 = time.perf_counter()
        m.vae.decode(latents / m.vae.config.scaling_factor, return_dict=False)
        _sync(device)
        out["vae_decode"] = 1000 * (time.perf_counter() - t0)
    if s.full:
        out["end_to_end"] = 1000 * (time.perf_counter() - t_start)
    return out


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def _environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def run_bench(settings: BenchSettings, log=print) -> dict:
    """Benchmark every model in ``settings.models``; returns the JSON-ready result (schema ``koala-bench/1``)."""
    s = settings
    s.check()
    device, dtype = torch.device(s.device), parse_dtype(s.dtype)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    loaded: dict[str, tuple[BenchModel, _Inputs]] = {}
    rows: dict[str, dict] = {}

    def get(name):
        if name in loaded:
            return loaded[name], False
        t0 = time.perf_counter()
        m = build_bench_model(name, device, dtype, s.components)
        log(f"built {name} ({m.source}) in {time.perf_counter() - t0:.1f}s")
        entry = (m, _Inputs(m, s, device, dtype))
        if s.keep_loaded:
            loaded[name] = entry
        if name not in rows:
            rows[name] = _static_row(name, m, s)
        return entry, True

    def release():
        if not s.keep_loaded:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if s.keep_loaded:  # build and warm everything first, then measure in interleaved rounds
        for name in s.models:
            (m, x), _ = get(name)
            for _ in range(s.warmup):
                _one_run(m, s, x, device)
    for r in range(s.repeats):
        for name in s.models:
            (m, x), fresh = get(name)
            if fresh and not s.keep_loaded:
                for _ in range(s.warmup):
                    _one_run(m, s, x, device)
            with PeakMemory(device) as mem:
                res = _one_run(m, s, x, device)
            row = rows[name]
            row["_runs"].append(res)
            row["memory"]["kind"] = mem.kind
            row["memory"]["peak_bytes"] = max(row["memory"].get("peak_bytes", 0), mem.peak)
            row["memory"]["peak_delta_bytes"] = max(row["memory"].get("peak_delta_bytes", 0), mem.delta)
            log(f"round {r + 1}/{s.repeats} {name}: U-Net step {statistics.median(res['unet_steps']):.1f} ms"
                + (f", end-to-end {res['end_to_end']:.0f} ms" if "end_to_end" in res else ""))
            if not s.keep_loaded:
                del m, x
                release()
    models = [_finish(rows[n]) for n in s.models]
    return {"schema": SCHEMA, "settings": asdict(s), "environment": _environment(device), "models": models,
            "relative": _relative(models)}


def _static_row(name: str, m: BenchModel, s: BenchSettings) -> dict:
    flops = unet_flops(dict(m.unet.config), s.resolution, batch=s.unet_batch, text_len=s.text_len, vae_scale=m.vae_scale)
    return {"name": name, "source": m.source, "params": m.params(), "weights_bytes": m.weight_bytes(),
            "unet_tflops_per_step": flops / 1e12, "memory": {}, "_runs": []}


def _finish(row: dict) -> dict:
    runs = row.pop("_runs")
    times = {"unet_step": _summary([t for r in runs for t in r["unet_steps"]]),
             "unet_total": _summary([r["unet_total"] for r in runs])}
    for key in ("text_encoders", "vae_decode", "end_to_end"):
        vals = [r[key] for r in runs if key in r]
        if vals:
            times[key] = _summary(vals)
    row["times_ms"] = times
    return row


def _relative(models: list[dict]) -> list[dict]:
    """Each model against the first one: speed-up of the U-Net step, params and FLOPs ratios (first / this)."""
    ref = models[0]
    out = []
    for m in models:
        # Same-round pairs saw the same background load: the median of per-round ratios is the robust figure.
        paired = [a / b for a, b in zip(ref["times_ms"]["unet_total"]["runs"], m["times_ms"]["unet_total"]["runs"])]
        out.append({
            "name": m["name"], "reference": ref["name"],
            "unet_step_speedup": ref["times_ms"]["unet_step"]["median"] / m["times_ms"]["unet_step"]["median"],
            "unet_speedup_per_round": paired,
            "unet_speedup_paired_median": statistics.median(paired),
            "unet_params_ratio": ref["params"]["unet"] / m["params"]["unet"],
            "unet_flops_ratio": ref["unet_tflops_per_step"] / m["unet_tflops_per_step"],
        })
    return out
