"""Side-by-side generation: one prompt, one seed, every loaded model, with per-model latency and memory.

This is the function behind the button of ``koala app`` (:mod:`koala.app.ui`); it needs no web framework, so the
tests call it directly. Each model samples with its own defaults (a student's recorded sampling, else the paper's:
Euler, 10 steps, cfg 3.5, the timestep spacing from the student's layer map or the teacher kind), through the same
:func:`koala.inference.generate` that ``koala generate`` uses: equal seed and settings give equal images.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..bench.memory import PeakMemory
from ..errors import KoalaError
from ..families import denoiser_of
from ..inference import generate, load_pipeline
from ..inference.generate import png_info

MAX_STEPS = 200
MAX_SIZE = 2048
MAX_IMAGES = 8


@dataclass
class ModelSpec:
    """A model to load: a pipeline dir (``model``), or a student U-Net / DiT dir (``unet``) + teacher pipeline
    (``base``)."""

    label: str
    model: str | None = None
    unet: str | None = None
    base: str | None = None
    note: str = ""  # shown on the page (e.g. "untrained: freshly compressed")
    vae: str | None = None  # a VAE directory in place of the pipeline's (e.g. a tiny AutoencoderTiny)


@dataclass
class Slot:
    """A loaded model, or the reason it could not be loaded (reported on the page, not raised)."""

    spec: ModelSpec
    pipe: object = None  # LoadedPipeline
    error: str | None = None
    params: int = 0
    # one generation at a time per model (a pipeline's scheduler holds per-call state); requests running at once
    # (``koala app --concurrency``) take turns on each model
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.pipe is not None


@dataclass
class Request:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0  # -1: a random seed (reported)
    steps: int | None = None  # None: each model's sampling defaults (the paper's 10 unless it records others)
    cfg: float | None = None  # None: each model's (the paper's 3.5 unless it records another)
    width: int | None = None  # None: the model's default size
    height: int | None = None
    images: int = 1

    def check(self, multiple: int = 8) -> None:
        """A KoalaError with the message the page shows, for input the models cannot take."""
        if not str(self.prompt or "").strip():
            raise KoalaError("the prompt is empty: type what the image should show")
        if self.steps is not None and not (1 <= int(self.steps) <= MAX_STEPS):
            raise KoalaError(f"steps {self.steps}: choose 1 to {MAX_STEPS} (the paper samples with 10)")
        if self.cfg is not None and not float(self.cfg) >= 0:
            raise KoalaError(f"guidance scale {self.cfg}: must be 0 or more (the paper uses 3.5)")
        for name, v in (("width", self.width), ("height", self.height)):
            if v is not None and (int(v) < multiple or int(v) > MAX_SIZE or int(v) % multiple):
                raise KoalaError(f"{name} {v}: must be a multiple of {multiple} between {multiple} and {MAX_SIZE}")
        if not (1 <= int(self.images) <= MAX_IMAGES):
            raise KoalaError(f"images per prompt {self.images}: choose 1 to {MAX_IMAGES}")


@dataclass
class ModelResult:
    label: str
    images: list = field(default_factory=list)  # PIL images
    files: list[str] = field(default_factory=list)  # PNGs with koala generate's metadata
    params: list[dict] = field(default_factory=list)
    latency_s: float = 0.0  # per image
    peak_gib: float = 0.0
    added_gib: float = 0.0  # the peak minus the memory in use before this model's generation
    memory_kind: str = ""
    params: int = 0  # the denoiser's parameters
    settings: dict = field(default_factory=dict)
    scores: list[dict] | None = None  # shapes-world verdicts, when scored
    error: str | None = None

    def summary(self) -> str:
        """The text under the model's images on the page."""
        if self.error:
            return f"**{self.label}**: {self.error}"
        s = self.settings
        lines = [
            f"**{self.label}** - denoiser params {self.params / 1e6:.2f}M",
            f"latency {self.latency_s:.3f} s / image - peak memory {self.peak_gib:.2f} GiB ({self.memory_kind}; "
            f"+{self.added_gib:.2f} GiB during this generation)",
            f"{s['scheduler']} ({s['timestep_spacing']} spacing), {s['steps']} steps, cfg {s['cfg']}, "
            f"{s['width']}x{s['height']}, {s['dtype']}, seed {s['seed']}",
        ]
        if self.scores:
            lines.append("shapes scorer: " + " | ".join(_verdict(sc) for sc in self.scores))
        return "  \n".join(lines)


def _verdict(score: dict) -> str:
    keys = [k for k in ("color", "shape", "binding", "spatial") if score.get(k) is not None]
    return ", ".join(f"{k} {100 * score[k]:.0f}%" for k in keys) or "no shapes facts in this prompt"


def load_models(specs: list[ModelSpec], device: str | None = None, dtype: str | None = None, log=print) -> list[Slot]:
    """Load every model once; a model that fails keeps its error message instead of stopping the others."""
    slots = []
    for spec in specs:
        try:
            lp = load_pipeline(
                model=spec.model, unet=spec.unet, base=spec.base, vae=spec.vae, device=device, dtype=dtype
            )
            n = sum(p.numel() for p in denoiser_of(lp.pipe).parameters())
            slots.append(Slot(spec, lp, params=n))
            log(f"loaded {spec.label}: {lp.model} ({lp.device}, {lp.dtype})")
        except (KoalaError, OSError, ValueError, RuntimeError) as err:
            slots.append(Slot(spec, error=f"could not load: {err}"))
            log(f"could not load {spec.label}: {err}")
    return slots


def compare(slots: list[Slot], req: Request, out_dir: str | None = None, score: bool = False) -> list[ModelResult]:
    """Generate ``req`` with every loaded model (same seeds), one model after the other; returns one result per slot.

    ``out_dir``: where the PNGs go (a new temporary folder by default), one subfolder per model.
    ``score``: add the shapes-world scorer's verdict (colour / shape / binding / spatial) per image.
    """
    req.check()
    seed = random.randint(0, 2**31 - 1) if int(req.seed) < 0 else int(req.seed)
    out_dir = out_dir or tempfile.mkdtemp(prefix="koala-app-")
    results = []
    for i, slot in enumerate(slots):
        res = ModelResult(slot.spec.label + (f" ({slot.spec.note})" if slot.spec.note else ""))
        if not slot.ok:
            res.error = slot.error
            results.append(res)
            continue
        lp = slot.pipe
        with slot.lock, PeakMemory(lp.pipe.device) as mem:
            t0 = time.perf_counter()
            gen = generate(
                lp,
                req.prompt,
                negative_prompt=req.negative_prompt or None,
                steps=None if req.steps is None else int(req.steps),
                cfg=None if req.cfg is None else float(req.cfg),
                seed=seed,
                images_per_prompt=int(req.images),
                width=int(req.width) if req.width else None,
                height=int(req.height) if req.height else None,
                progress=False,
                log=lambda *_: None,
            )
            elapsed = time.perf_counter() - t0
        folder = os.path.join(out_dir, f"{i:02d}")
        os.makedirs(folder, exist_ok=True)
        for j, (img, params) in enumerate(zip(gen.images, gen.params)):
            path = os.path.join(folder, f"{j:02d}-s{params['seed']}.png")
            img.save(path, pnginfo=png_info(params))
            res.files.append(path)
        res.images, res.params = gen.images, gen.params
        res.latency_s = elapsed / max(1, len(gen.items))
        res.peak_gib, res.added_gib = mem.peak / 2**30, mem.delta / 2**30
        res.memory_kind = "CUDA max allocated" if mem.kind.startswith("cuda") else "process peak RSS"
        res.params = slot.params
        res.settings = {**gen.params[0], "seed": seed} if gen.params else {}
        if score:
            from ..lab.score import score_image

            res.scores = [
                {k: v for k, v in score_image(np.asarray(img.convert("RGB")), req.prompt).items() if k != "detected"}
                for img in gen.images
            ]
        results.append(res)
    return results


def results_json(results: list[ModelResult]) -> str:
    """The numbers of a comparison (no images), as shown on the page."""
    keep = (
        "label",
        "files",
        "latency_s",
        "peak_gib",
        "added_gib",
        "memory_kind",
        "params",
        "settings",
        "scores",
        "error",
    )
    return json.dumps([{k: v for k, v in asdict(r).items() if k in keep} for r in results], indent=1)
