"""Time text encoders, denoiser steps and VAE decode of several models, interleaved, and report medians.

One *run* mirrors the family's pipeline (``StableDiffusionXLPipeline``, ``PixArtSigmaPipeline``, ...): encode the
prompt batch with the text encoder(s), then ``steps`` Euler steps (the denoiser, U-Net or DiT, on the CFG-doubled
batch when ``cfg > 1``), then VAE decode. Steps and cfg left None are each model's sampling defaults (a student
pipeline's recorded ones, else the paper's 10 steps, cfg 3.5). The component called ``unet`` is the denoiser,
whatever its kind. Each component is timed with a device sync at its boundaries; the whole run is the end-to-end
latency. Models are measured in rounds A, B, A, B, ... so that background load (other processes on a shared CPU)
hits all of them alike; medians are reported.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from ..arch.stats import forward_flops
from ..errors import KoalaError
from ..families import get_family
from ..utils.compile import compile_module
from ..utils.devices import check_dtype_on_device, parse_device, parse_dtype, tree_to
from .memory import PeakMemory
from .models import BenchModel, build_bench_model, preset_unet_config, swap_vae, vae_decoder_modules

SCHEMA = "koala-bench/1"
COMPONENTS = ("text", "unet", "vae")


@dataclass
class BenchSettings:
    models: list[str]
    resolution: int = 1024
    steps: int | None = None  # None: each model's sampling defaults (a student's record, else the paper's 10)
    batch: int = 1
    cfg: float | None = None  # None: each model's (a student's record, else the paper's 3.5)
    device: str = "cuda"
    dtype: str = "fp16"
    components: list[str] = field(default_factory=lambda: list(COMPONENTS))
    warmup: int = 1
    repeats: int = 3
    keep_loaded: bool = True  # False: build each model anew every round (only one in memory at a time)
    text_len: int | None = None  # tokens per prompt; None: the family's (CLIP 77, PixArt-Σ's T5 300)
    channels_last: bool = (
        False  # U-Net in channels_last memory format (the VAE decoder is slower so: see results/h200)
    )
    compile: bool = False  # torch.compile the U-Net (warm-up runs absorb the compilation)
    compile_vae: bool = False  # torch.compile the VAE decoder too
    compile_text: bool = False  # torch.compile the text encoders too
    compile_mode: str | None = (
        None  # torch.compile mode: None (default), reduce-overhead (CUDA graphs), max-autotune...
    )
    vae_tiling: bool = False  # decode in tiles (diffusers enable_tiling): less memory at 1024^2 and above
    memory_cap_gib: float | None = None  # CUDA: cap this process's GPU memory (e.g. 8 for an 8 GB card)
    vae: str | None = None  # a VAE directory (e.g. a tiny AutoencoderTiny) timed in place of each model's

    def check(self) -> None:
        if not self.models:
            raise KoalaError("models: give at least one preset name or pipeline directory", option="models")
        for name in self.models:  # fail before spending minutes building the earlier models
            if not os.path.isdir(name):
                preset_unet_config(name)  # raises for an unknown name
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or not self.components:
            raise KoalaError(f"components: unknown {bad}; choose from {', '.join(COMPONENTS)}", option="components")
        if "unet" not in self.components:
            raise KoalaError(
                "components must include unet (its output feeds the VAE and the report)", option="components"
            )
        if self.resolution % 64:
            raise KoalaError(f"resolution {self.resolution} must be a multiple of 64", option="resolution")
        if (self.steps is not None and self.steps < 1) or self.batch < 1 or self.repeats < 1 or self.warmup < 0:
            raise KoalaError("steps, batch and repeats must be >= 1 and warmup >= 0", option="steps")
        check_dtype_on_device(parse_dtype(self.dtype), parse_device(self.device))  # unknown device / dtype
        if self.vae and "vae" not in self.components:
            raise KoalaError("vae: a VAE to time needs the vae component (--components unet,vae)", option="vae")
        if self.memory_cap_gib is not None and (not self.device.startswith("cuda") or not self.memory_cap_gib > 0):
            raise KoalaError("memory_cap_gib needs a cuda device and a positive size", option="memory_cap_gib")
        if self.compile_mode and not (self.compile or self.compile_vae or self.compile_text):
            raise KoalaError(
                "compile_mode needs something to compile (compile, compile_vae or compile_text)", option="compile_mode"
            )
        if self.device == "cpu" and parse_dtype(self.dtype) == torch.float16:
            raise KoalaError(
                "dtype fp16 on the cpu device is very slow or unsupported; use fp32 or bf16 on CPU", option="dtype"
            )

    def for_model(self, name: str) -> "BenchSettings":
        """These settings with None steps / cfg set to model ``name``'s sampling defaults (a pipeline directory's
        recorded ones; the paper's 10 steps, cfg 3.5 for presets and pipelines that record none)."""
        from ..families.sampling import SamplingDefaults, sampling_defaults_of

        d = sampling_defaults_of(name) if os.path.isdir(name) else SamplingDefaults()
        return replace(
            self,
            steps=d.steps if self.steps is None else self.steps,
            cfg=d.guidance_scale if self.cfg is None else self.cfg,
        )

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
        fam, c = get_family(m.family), dict(m.unet.config)
        g = torch.Generator().manual_seed(0)
        lat = s.resolution // m.vae_scale
        text_len = s.text_len or fam.default_text_len
        vocab = m.text_encoders[0].config.vocab_size if m.text_encoders else 1000
        self.ids = [
            fam.token_batch(torch.randint(0, vocab, (s.batch, text_len), generator=g).to(device))
            for _ in m.text_encoders
        ]
        # denoiser conditioning when the text encoders are not run (or do not fit a custom model): random, right shapes
        self.cond = tree_to(fam.dummy_cond(c, s.unet_batch, text_len, device="cpu", dtype=dtype), device)
        size = torch.tensor([[s.resolution, s.resolution]] * s.unet_batch)
        self.micro = {
            k: v.to(device, dtype)
            for k, v in fam.micro_conditions(
                {"original_size": size, "crop_top_left": torch.zeros_like(size), "target_size": size}
            ).items()
        }
        self.latents = torch.randn(s.batch, c["in_channels"], lat, lat, generator=g).to(device, dtype)


@torch.no_grad()
def apply_speed_modes(m: BenchModel, s: BenchSettings) -> None:
    """channels_last, VAE tiling and torch.compile, as ``koala generate`` applies them."""
    if s.channels_last:  # the U-Net only: on an H200 (fp16, 1024^2) a channels_last VAE decoded 1.5x slower
        m.unet.to(memory_format=torch.channels_last)
    if s.vae_tiling and m.vae is not None:
        m.vae.enable_tiling()
    chosen = [m.unet] if s.compile else []
    if s.compile_vae and m.vae is not None:
        chosen += vae_decoder_modules(m.vae)
    if s.compile_text:
        chosen += list(m.text_encoders)
    for module in chosen:
        compile_module(module, mode=s.compile_mode)


@torch.no_grad()
def _one_run(m: BenchModel, s: BenchSettings, x: _Inputs, device) -> dict:
    """One pipeline-shaped run; returns milliseconds per component and the list of U-Net step times."""
    from ..testing.tiny import sdxl_scheduler

    fam = get_family(m.family)
    out: dict = {}
    _sync(device)
    t_start = time.perf_counter()
    cond_in = x.cond
    if "text" in s.components and m.text_encoders:
        t0 = time.perf_counter()
        cond = fam.encode_tokens(x.ids, m.text_encoders)
        if s.cfg > 1:  # the negative prompt: zeros (SDXL, force_zeros_for_empty_prompt) or encoded again (SD-1.x)
            neg = (
                {k: torch.zeros_like(v) for k, v in cond.items()}
                if fam.zero_uncond
                else fam.encode_tokens(x.ids, m.text_encoders)
            )
            cond = {k: torch.cat([neg[k], v]) for k, v in cond.items()}
        _sync(device)
        out["text_encoders"] = 1000 * (time.perf_counter() - t0)
        key = fam.text_cond_keys[0]
        if cond[key].shape[-1] == x.cond[key].shape[-1]:  # else a denoiser-only custom model: random conditioning
            cond_in = {**cond, **x.micro}
    sched = sdxl_scheduler()
    sched.set_timesteps(s.steps, device=device)
    latents = x.latents * sched.init_noise_sigma
    steps_ms = []
    for t in sched.timesteps:
        t0 = time.perf_counter()
        inp = torch.cat([latents] * 2) if s.cfg > 1 else latents
        inp = sched.scale_model_input(inp, t)
        eps = fam.prediction(fam.forward(m.unet, inp, t.reshape(1).expand(inp.shape[0]), cond_in), latents.shape[1])
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
    env = {
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
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
    per_model = {name: s.for_model(name) for name in s.models}  # steps and cfg resolved per model
    rows: dict[str, dict] = {}
    if s.memory_cap_gib is not None:  # what an N-GiB card leaves PyTorch (tensors only; CUDA context aside)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, s.memory_cap_gib * 2**30 / total), device.index or 0)

    def get(name):
        if name in loaded:
            return loaded[name], False
        t0 = time.perf_counter()
        m = build_bench_model(name, device, dtype, s.components)
        if s.vae and m.vae is not None:
            swap_vae(m, s.vae, device, dtype)
        apply_speed_modes(m, s)
        log(f"built {name} ({m.source}) in {time.perf_counter() - t0:.1f}s")
        entry = (m, _Inputs(m, per_model[name], device, dtype))
        if s.keep_loaded:
            loaded[name] = entry
        if name not in rows:
            rows[name] = _static_row(name, m, per_model[name])
        return entry, True

    def release():
        if not s.keep_loaded:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    current = s.models[0]
    try:
        if s.keep_loaded:  # build and warm everything first, then measure in interleaved rounds
            for name in s.models:
                current = name
                (m, x), _ = get(name)
                for _ in range(s.warmup):
                    _one_run(m, per_model[name], x, device)
        for r in range(s.repeats):
            for name in s.models:
                current = name
                (m, x), fresh = get(name)
                if fresh and not s.keep_loaded:
                    for _ in range(s.warmup):
                        _one_run(m, per_model[name], x, device)
                with PeakMemory(device) as mem:
                    res = _one_run(m, per_model[name], x, device)
                row = rows[name]
                row["_runs"].append(res)
                row["memory"]["kind"] = mem.kind
                row["memory"]["peak_bytes"] = max(row["memory"].get("peak_bytes", 0), mem.peak)
                row["memory"]["peak_delta_bytes"] = max(row["memory"].get("peak_delta_bytes", 0), mem.delta)
                log(
                    f"round {r + 1}/{s.repeats} {name}: U-Net step {statistics.median(res['unet_steps']):.1f} ms"
                    + (f", end-to-end {res['end_to_end']:.0f} ms" if "end_to_end" in res else "")
                )
                if not s.keep_loaded:
                    del m, x
                    release()
    except torch.OutOfMemoryError as err:
        cap = f" under the {s.memory_cap_gib:g} GiB cap" if s.memory_cap_gib else ""
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        raise KoalaError(
            f"{current}: CUDA out of memory{cap} (peak allocated {peak:.2f} GiB before failing); try "
            "vae_tiling, a smaller resolution or batch, or benchmark one model at a time"
        ) from err
    models = [_finish(rows[n]) for n in s.models]
    return {
        "schema": SCHEMA,
        "settings": asdict(s),
        "environment": _environment(device),
        "models": models,
        "relative": _relative(models),
    }


def _static_row(name: str, m: BenchModel, s: BenchSettings) -> dict:
    fam, cfg = get_family(m.family), dict(m.unet.config)
    meta_unet = fam.build_model(cfg, "meta")
    flops = forward_flops(meta_unet, fam.dummy_inputs(cfg, s.resolution // m.vae_scale, s.unet_batch, s.text_len))
    return {
        "name": name,
        "source": m.source,
        "denoiser": fam.model_subfolder,
        "params": m.params(),
        "weights_bytes": m.weight_bytes(),
        "unet_tflops_per_step": flops / 1e12,
        "steps": s.steps,  # as timed: the settings' or, left None there, the model's sampling defaults
        "cfg": s.cfg,
        "memory": {},
        "_runs": [],
    }


def _finish(row: dict) -> dict:
    runs = row.pop("_runs")
    times = {
        "unet_step": _summary([t for r in runs for t in r["unet_steps"]]),
        "unet_total": _summary([r["unet_total"] for r in runs]),
    }
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
        out.append(
            {
                "name": m["name"],
                "reference": ref["name"],
                "unet_step_speedup": ref["times_ms"]["unet_step"]["median"] / m["times_ms"]["unet_step"]["median"],
                "unet_speedup_per_round": paired,
                "unet_speedup_paired_median": statistics.median(paired),
                "unet_params_ratio": ref["params"]["unet"] / m["params"]["unet"],
                "unet_flops_ratio": ref["unet_tflops_per_step"] / m["unet_tflops_per_step"],
            }
        )
    return out
