"""`koala demo`: the whole KOALA method, offline on CPU, in the shapes world.

1. compress the packaged shapes teacher (SDXL topology, depth [., 2, 10]) to KOALA-700M topology,
2. distill it with the paper's objective (task + outKD + SA-bottom featKD + LF at DW-1/UP-3; for the short CPU
   budget outKD weighted 4x, featKD 0.3x, lr 2e-3 with a cosine decay: benchmarks/results/shapes-demo-tuning.md) on
   the images encoded once, the teacher's forwards in a second process (a core each) when there are 2 cores,
3. generate a teacher / student-before-KD / student-after-KD grid for fixed prompts,
4. print params, U-Net latency and the shapes scorer's accuracies for each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import KoalaError
from ..families import denoiser_of, find_model_folder, model_subfolders
from ..utils.files import refuse_existing
from .features import FEATURES, feature_spec

# val prompts a --few-step demo scores per model (plain demo: 64)
FEWSTEP_NUM_EVAL = 256


@dataclass
class DemoSettings:
    out: str = "koala-demo"
    steps: int = 950  # distillation steps
    batch_size: int = 16  # global: split over the processes
    lr: float = 2e-3  # AdamW peak learning rate (the tuning curve: benchmarks/results/shapes-demo-tuning.md)
    lr_schedule: str = "cosine"  # constant (the paper's) | linear | cosine: a decay to 0 at the last step
    warmup: int = 50  # linear learning-rate warmup steps
    max_grad_norm: float = 0.0  # 0: no clipping, as in the paper
    weight_decay: float = 0.0  # as in the paper
    loss_out: float = 4.0  # weight of L_outKD (the paper: 1): tuned for the demo's short budget, where the
    # teacher's output is the least noisy target
    loss_feat: float = 0.3  # weight of L_featKD (the paper: 1; L_task keeps 1): at 1 and 3 the short run's
    # binding was lower (shapes-demo-tuning.md)
    ema: float = 0.0  # EMA decay of the student's weights, scored instead of the raw weights (0: off, as
    # in the paper)
    num_train: int = 2000  # shapes images to distill on
    # val prompts scored per model; None: 64, or FEWSTEP_NUM_EVAL with few_step (its goals compare rows a few points
    # apart, and on 64 prompts the same student scores up to 5 binding points apart between sample seeds)
    num_eval: int | None = None
    sample_steps: int = 20  # Euler steps (the teacher's scores were measured with 20 steps, cfg 5)
    guidance: float = 5.0
    seed: int = 0
    preset: str = "koala-700m"  # a preset of the teacher's family, or a JSON spec ('{"num_layers": 6}' for a DiT)
    features: Any = "SA+LF"  # a key of FEATURES: SA+LF (paper) | SA | CA | FFN | Res | LF-all (BK) | none, or a
    # kd.features mapping (e.g. {"SA": ["UP-1"]})
    overwrite: bool = False
    progress: bool = True
    teacher: str | None = None  # a shapes teacher pipeline dir; default: the packaged one
    threads: int = 0  # torch CPU threads; 0: each training process (and its teacher worker) gets its share
    # of the cores, scoring all of them
    fused_optimizer: bool = True  # torch's fused AdamW (one kernel per step: ~5 % of a demo step saved)
    cache: bool = True  # encode the training images once (VAE latents + text conditioning, koala.data's
    # cache) instead of at every step; each image then keeps one VAE latent sample
    # the teacher's forwards in a second process, a micro-batch ahead of the student (train.teacher_worker): with
    # a core each, a step costs about the student's part alone (shapes-demo-tuning.md, round 4); on by default
    # with 2 or more cores
    teacher_worker: bool = field(default_factory=lambda: (os.cpu_count() or 1) >= 2)
    # data-parallel training processes (accelerate launch on CPU; the batch is split); None: as many as the cores
    # hold (a core each, two with the teacher worker), up to 2
    processes: int | None = None
    # --few-step: after the KD stage, a step-distillation stage (koala.distill.fewstep) from the KD student, and
    # rows for the KD student and the few-step student at few_step_counts steps
    few_step: bool = False
    fewstep_method: str = "lcm"  # a STEP_OBJECTIVES name
    fewstep_steps: int = 300  # its optimizer steps
    fewstep_lr: float = 1e-4  # (2e-4 and 5e-4 scored lower: benchmarks/results/fewstep-shapes.md)
    fewstep_teacher: str = "teacher"  # teacher: the big teacher is the step teacher; student: the KD student itself
    fewstep_guidance: float = 3.0  # the step teacher's guidance (3 scored above 2 and 5)
    few_step_counts: tuple = (4, 2, 1)

    def __post_init__(self):
        if self.num_eval is None:
            self.num_eval = FEWSTEP_NUM_EVAL if self.few_step else 64
        if self.processes is None:
            per_process = 2 if self.teacher_worker else 1
            self.processes = max(1, min(2, (os.cpu_count() or 1) // per_process))

    @classmethod
    def fast(cls, **kw) -> "DemoSettings":
        """Seconds-long variant for CI: same code path, tiny budgets."""
        base = dict(steps=4, batch_size=4, num_train=16, num_eval=4, sample_steps=2, processes=1, fewstep_steps=2)
        base.update(kw)
        return cls(**base)


# DemoSettings that undo the demo's short-budget tuning: the paper's loss weights and constant learning rate, the
# images encoded at every step, torch's foreach AdamW, the teacher in the training process -- what the shapes study
# and research tables ran with
PAPER_TRAINING = dict(
    loss_out=1.0,
    loss_feat=1.0,
    lr_schedule="constant",
    warmup=0,
    cache=False,
    fused_optimizer=False,
    teacher_worker=False,
)

GRID_PROMPTS = [
    "a red circle",
    "a blue square to the left of a yellow triangle",
    "a green triangle above a red square",
    "a small yellow circle and a large blue triangle",
]


def _images_np(images) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB")) for im in images]


def _sample(pipe_dir: str, prompts: list[str], s: DemoSettings, model_dir: str | None = None):
    """Images of ``prompts`` from the pipeline ``pipe_dir`` (with the denoiser ``model_dir`` swapped in), and its
    denoiser."""
    from ..inference import generate, load_pipeline
    from .models import IMAGE_SIZE

    if model_dir:
        loaded = load_pipeline(unet=model_dir, base=pipe_dir, device="cpu", dtype="fp32")
    else:
        loaded = load_pipeline(pipe_dir, device="cpu", dtype="fp32")
    res = generate(
        loaded,
        prompts,
        steps=s.sample_steps,
        cfg=s.guidance,
        seed=s.seed,
        batch_size=16,
        width=IMAGE_SIZE,
        height=IMAGE_SIZE,
        progress=False,
        log=lambda *_: None,
    )
    return res.images, denoiser_of(loaded.pipe)


def _unet_latency_ms(unet, repeats: int = 5) -> float:
    """Median ms of one U-Net forward (batch 2 = cfg pair) at the shapes latent size, on one CPU thread (at this
    size a second thread only adds overhead)."""
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    kw = dict(
        encoder_hidden_states=torch.randn(2, 8, c.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.randn(2, pooled), "time_ids": torch.zeros(2, 6)},
    )
    times, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            unet(x, torch.tensor([500, 500]), **kw)
            for _ in range(repeats):
                t0 = time.perf_counter()
                unet(x, torch.tensor([500, 500]), **kw)
                times.append(1000 * (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times))


def _grid(rows: list[tuple[str, list]], path: str, prompts: list[str] | None = None) -> str:
    """One row per model (its name on the left), one column per prompt (the prompt, wrapped, above it)."""
    import textwrap

    from PIL import Image, ImageDraw

    cell, label_w, line_h = 96, 150, 11
    n = max(len(images) for _, images in rows)
    wrapped = [textwrap.wrap(p, width=15) for p in (prompts or [])]
    head = (max((len(w) for w in wrapped), default=0) * line_h + 6) if wrapped else 0
    canvas = Image.new("RGB", (label_w + n * cell, head + len(rows) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(wrapped):
        for i, line in enumerate(lines):
            draw.text((label_w + c * cell + 3, 3 + i * line_h), line, fill="black")
    for r, (label, images) in enumerate(rows):
        draw.text((6, head + r * cell + cell // 2 - 6), label, fill="black")
        for c, im in enumerate(images):
            canvas.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + c * cell, head + r * cell))
    canvas.save(path)
    return path


def prepare(s: DemoSettings, log=print) -> tuple[str, str, str]:
    """Fresh ``s.out`` with the compressed student and the shapes training data: (teacher, student_init, data), the
    data being the image folder or (``s.cache``) the cache encoded from it."""
    import shutil

    from ..compress import compress
    from .models import IMAGE_SIZE, shapes_teacher_dir
    from .shapes import write_shapes_dataset

    if s.processes < 1:
        raise KoalaError(f"processes must be 1 or more, got {s.processes}", option="processes")
    if isinstance(s.features, str) and s.features not in FEATURES:
        raise KoalaError(f"features {s.features!r}: choose one of {', '.join(FEATURES)}", option="features")
    out = os.path.abspath(s.out)
    refuse_existing(out, s.overwrite)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    teacher_dir = s.teacher or shapes_teacher_dir()
    log(f"[1/4] compress the shapes teacher to {s.preset} topology")
    student_init = os.path.join(out, "student-init")
    comp = compress(teacher_dir, s.preset, student_init)
    log(f"      denoiser params {comp.teacher_params:,} -> {comp.student_params:,} ({100 * comp.kept:.1f}% kept)")
    data_dir = write_shapes_dataset(
        os.path.join(out, "data"), num_train=s.num_train, num_val=0, seed=s.seed, size=IMAGE_SIZE, progress=s.progress
    )
    train_dir = os.path.join(data_dir, "train")
    if s.cache:
        cache_dir = os.path.join(out, "cache")
        log(f"      encode the {s.num_train} training images once (VAE latents, text conditioning) into {cache_dir}")
        return teacher_dir, student_init, encode_training_data(s, teacher_dir, train_dir, cache_dir)
    return teacher_dir, student_init, train_dir


def encode_training_data(s: DemoSettings, teacher_dir: str, train_dir: str, cache_dir: str) -> str:
    """The demo's image folder encoded by the teacher's VAE and text encoders into a koala.data cache (fp32, the
    loader's center crop, no flips); returns ``cache_dir``."""
    from ..data import build_cache
    from .models import IMAGE_SIZE

    build_cache(
        data_source(train_dir),
        teacher_dir,
        cache_dir,
        resolution=IMAGE_SIZE,
        batch_size=50,
        dtype="fp32",
        seed=s.seed,
        progress=s.progress,
    )
    return cache_dir


def data_source(train_dir: str) -> dict:
    return {"type": "folder", "path": train_dir, "random_flip": False, "center_crop": True}


def distill(
    s: DemoSettings,
    teacher_dir: str,
    student_init: str,
    train_dir: str,
    run_name: str = "distill",
    out_kd: bool = True,
    kd_selection: str | None = None,
    seed: int | None = None,
    extra: list[str] = (),
) -> str:
    """Distill the compressed student with ``s.features``; returns the final student's directory (its unet/ or
    transformer/). With ``kd_selection`` the student is compressed anew from those teacher layers (Table 10c:
    initialised and matched alike) instead of loaded from ``student_init``."""
    from ..distill import load_config, train
    from .models import IMAGE_SIZE

    spec = feature_spec(s.features)
    features = json.dumps(spec).replace(" ", "")
    overrides = [
        f"teacher.pipeline={teacher_dir}",
        "teacher.dtype=fp32",
        f"student.path={student_init}" if not kd_selection else f"student.preset={s.preset}",
        f"kd.features={features}",
        f"loss.feat={s.loss_feat if spec else 0.0}",
        f"loss.out={s.loss_out if out_kd else 0.0}",
        f"train.max_grad_norm={s.max_grad_norm}",
        f"train.weight_decay={s.weight_decay}",
        *data_overrides(train_dir),
        "train.caption_dropout=0.1",
        f"train.output_dir={os.path.join(os.path.abspath(s.out), run_name)}",
        f"train.resolution={IMAGE_SIZE}",
        f"train.batch_size={s.batch_size}",
        f"train.max_steps={s.steps}",
        f"train.lr={s.lr}",
        f"train.lr_schedule={s.lr_schedule}",
        f"train.lr_warmup_steps={s.warmup}",
        f"train.fused_optimizer={str(s.fused_optimizer).lower()}",
        f"train.checkpoint_every={s.steps}",
        "train.keep_checkpoints=1",
        f"train.ema.enabled={str(s.ema > 0).lower()}",
        *([f"train.ema.decay={s.ema}"] if s.ema > 0 else []),
        f"train.seed={s.seed if seed is None else seed}",
        f"train.progress={str(s.progress).lower()}",
        "train.log_every=50",
        "validation.every=0",
        f"train.cpu_threads={threads_for(s, training=True)}",
        f"train.teacher_worker={str(s.teacher_worker).lower()}",
    ]
    if kd_selection:
        overrides.append(f"kd.layer_selection={kd_selection}")
    overrides += list(extra)
    cfg = load_config(None, overrides)  # checked here, in this process, before any launch
    if s.processes > 1:
        checkpoint = _launch(cfg, overrides, s.processes)
    else:
        checkpoint = train(cfg)["checkpoint"]
    return model_subdir(checkpoint, ema=s.ema > 0)


def data_overrides(train_dir: str) -> list[str]:
    """The ``data.*`` overrides for the demo's training data: an image folder, or a cache built from one."""
    if os.path.isfile(os.path.join(train_dir, "cache_config.json")):
        return ["data.type=cache", f"data.path={train_dir}"]
    return [f"data.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in data_source(train_dir).items()]


def _processes_text(s: DemoSettings) -> str:
    text = f"{s.processes} training process{'es' if s.processes > 1 else ''}"
    if s.teacher_worker:
        text += " + its teacher process" if s.processes == 1 else " + a teacher process each"
    return text


def threads_for(s: DemoSettings, training: bool) -> int:
    """torch CPU threads: ``s.threads`` when set; else each training process and its teacher worker get their
    share of the cores, and scoring (in the main process, after training) all of them."""
    if s.threads:
        return s.threads
    cores = os.cpu_count() or 1
    return max(1, cores // (s.processes * (2 if s.teacher_worker else 1))) if training else cores


def model_subdir(checkpoint: str, ema: bool = False) -> str:
    """A checkpoint's denoiser folder: unet/ or transformer/ (their _ema twins with ``ema``)."""
    found = find_model_folder(checkpoint, "_ema" if ema else "")
    if found is None:
        raise KoalaError(f"{checkpoint}: no denoiser folder ({', '.join(model_subfolders())}) in this checkpoint")
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(cfg, overrides: list[str], processes: int) -> str:
    """Train on ``processes`` CPU processes (`accelerate launch`, gloo; data-parallel, the same global batch split
    across them, so each core runs its share of every step). Returns the final checkpoint directory."""
    import subprocess
    import sys

    from ..distill.checkpoint import list_checkpoints

    tcfg = cfg.train
    if tcfg.batch_size % processes:
        raise KoalaError(f"batch size {tcfg.batch_size} does not split over {processes} processes", option="processes")
    per_process = [o for o in overrides if not o.startswith("train.batch_size=")]
    per_process.append(f"train.batch_size={tcfg.batch_size // processes}")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "koala.cli",
        "distill",
        *per_process,
    ]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(tcfg.cpu_threads or 1), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise KoalaError(
            f"distillation on {processes} processes failed (exit code {proc.returncode}); its log is "
            f"above. Run it on one process with --processes 1",
            option="processes",
        )
    step = tcfg.max_steps
    found = [d for st, d in list_checkpoints(tcfg.output_dir) if st == step]
    if not found:
        raise KoalaError(
            f"distillation on {processes} processes ended without a step-{step} checkpoint in {tcfg.output_dir}",
            option="processes",
        )
    return found[0]


def demo_rows(s: DemoSettings, init_dir: str, kd_dir: str, few_dir: str | None):
    """``(name, denoiser dir, stage, sampling steps, guidance)`` per results row: the teacher, the student before
    and after KD at the teacher's sampling; with a few-step student, the KD student at the few-step counts (Euler,
    the teacher's guidance: what asking it for fewer steps gives) and the few-step student at them (its recorded
    sampler, guidance 1)."""
    rows = [
        ("teacher", None, "teacher", s.sample_steps, s.guidance),
        ("student, before KD", init_dir, "before-kd", s.sample_steps, s.guidance),
        ("student, after KD", kd_dir, "kd", s.sample_steps, s.guidance),
    ]
    if few_dir:
        rows += [(f"student, after KD, {n} steps", kd_dir, "kd", n, s.guidance) for n in s.few_step_counts]
        rows += [(f"few-step student, {n} steps", few_dir, "few-step", n, 1.0) for n in s.few_step_counts]
    return rows


def step_stage(s: DemoSettings, teacher_dir: str, kd_dir: str, train_dir: str, log=print) -> str:
    """The step-distillation stage (``fewstep.method``) from the KD student on the same data; returns the few-step
    student's directory. The step teacher is the big teacher (``fewstep_teacher=teacher``, the default) or the KD
    student itself; only the step objective trains (no KD terms), in one process (a step objective runs its teacher
    in the training process)."""
    log(
        f"[2b] step distillation: {s.fewstep_method} {s.fewstep_steps} steps, lr {s.fewstep_lr:g}, step teacher "
        f"{'the KD student' if s.fewstep_teacher == 'student' else 'the teacher'} at guidance {s.fewstep_guidance:g},"
        f" for {', '.join(map(str, s.few_step_counts))}-step sampling"
    )
    stage = dataclasses.replace(
        s,
        steps=s.fewstep_steps,
        lr=s.fewstep_lr,
        lr_schedule="constant",
        warmup=0,
        ema=0.0,
        teacher_worker=False,
        processes=1,
        threads=s.threads or (os.cpu_count() or 1),
    )
    extra = [
        f"fewstep.method={s.fewstep_method}",
        f"fewstep.teacher={s.fewstep_teacher}",
        f"fewstep.guidance_scale={s.fewstep_guidance}",
        f"fewstep.steps={max(s.few_step_counts)}",
        "loss.task=0",
        "loss.out=0",
        "loss.feat=0",
        "kd.features={}",
        "train.caption_dropout=0.0",
    ]
    return distill(stage, teacher_dir, kd_dir, train_dir, run_name="fewstep", extra=extra)


def eval_prompts(s: DemoSettings) -> list[str]:
    from .models import IMAGE_SIZE
    from .shapes import generate_scenes

    return [sc.text for sc in generate_scenes(s.num_eval, "val", s.seed, IMAGE_SIZE)]


def score_model(s: DemoSettings, teacher_dir: str, model_dir: str | None, prompts: list[str]) -> tuple[dict, object]:
    """Scorer accuracies (colour, shape, binding, spatial) of the teacher pipeline with the denoiser ``model_dir``
    swapped in, and that denoiser."""
    from .score import score_pairs

    images, model = _sample(teacher_dir, prompts, s, model_dir)
    agg, _ = score_pairs(_images_np(images), prompts)
    return {k: round(float(agg[k]), 4) for k in ("color", "shape", "binding", "spatial") if k in agg}, model


def _quiet_libraries() -> None:
    """Keep the demo's output to its own steps: no per-component loading bars or library chatter."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_demo(s: DemoSettings, log=print) -> dict:
    """Run the demo into ``s.out``; returns the results table (also written to ``results.json``)."""
    if s.threads < 0:
        raise KoalaError(f"threads must be 0 (automatic) or more, got {s.threads}", option="threads")
    t_start, threads_before = time.time(), torch.get_num_threads()
    torch.set_num_threads(threads_for(s, training=False))  # the training processes set their own
    try:
        return _run_demo(s, t_start, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_demo(s: DemoSettings, t_start: float, log) -> dict:
    from ..utils.weights import count_params

    _quiet_libraries()
    teacher_dir, student_init, train_dir = prepare(s, log)
    out_w = "" if s.loss_out == 1 else f"{s.loss_out:g} x "
    feat_w = "" if s.loss_feat == 1 else f"{s.loss_feat:g} x "
    sched = "" if s.lr_schedule == "constant" else f", {s.lr_schedule} decay"
    log(
        f"[2/4] distill {s.steps} steps, batch {s.batch_size}, lr {s.lr:g}{sched} (task + {out_w}outKD + "
        f"{feat_w}featKD "
        f"{s.features}{f'; EMA {s.ema:g}' if s.ema else ''}) on {s.num_train} shapes images, {_processes_text(s)}"
    )
    student_dir = distill(s, teacher_dir, student_init, train_dir)
    few_dir = step_stage(s, teacher_dir, student_dir, train_dir, log) if s.few_step else None
    torch.set_num_threads(threads_for(s, training=False))  # one in-process training run set its own

    log(
        f"[3/4] generate and score {s.num_eval} val prompts per model ({s.sample_steps} Euler steps, cfg {s.guidance}"
        + (f"; few-step rows at {', '.join(map(str, s.few_step_counts))} steps" if s.few_step else "")
        + ")"
    )
    prompts = eval_prompts(s)
    rows, grid_rows, latency = [], [], {}
    for name, model_dir, stage, steps, cfg in demo_rows(s, model_subdir(student_init), student_dir, few_dir):
        row_s = dataclasses.replace(s, sample_steps=steps, guidance=cfg)
        scores, model = score_model(row_s, teacher_dir, model_dir, prompts)
        grid_images, _ = _sample(teacher_dir, GRID_PROMPTS, row_s, model_dir)
        grid_rows.append((name, grid_images))
        if model_dir not in latency:  # the denoiser's forward time (one per model, whatever its step count)
            latency[model_dir] = round(_unet_latency_ms(model), 2)
        rows.append(
            {
                "model": name,
                "stage": stage,
                "sample_steps": steps,
                "guidance": cfg,
                "params": count_params(model),
                "latency_ms": latency[model_dir],
                **scores,
            }
        )
    out = os.path.abspath(s.out)
    grid = _grid(grid_rows, os.path.join(out, "grid.png"), GRID_PROMPTS)
    with open(os.path.join(out, "grid_prompts.txt"), "w") as f:
        f.write("\n".join(GRID_PROMPTS) + "\n")

    log("[4/4] results")
    from ..card import add_results

    pct = [
        {**r, **{k: f"{100 * r[k]:.1f}%" for k in ("color", "shape", "binding", "spatial") if r.get(k) is not None}}
        for r in rows
    ]
    add_results(
        os.path.dirname((few_dir or student_dir).rstrip(os.sep)),
        pct,
        ["model", "stage", "sample_steps", "params", "latency_ms", "color", "shape", "binding", "spatial"],
        f"Shapes world, `koala demo` ({len(prompts)} held-out prompts per model; teacher and KD rows Euler, cfg "
        f"{s.guidance}, few-step rows the student's recorded sampler at cfg 1; the shapes scorer: colour / shape / "
        "colour-shape binding / spatial accuracy).",
    )
    result = {
        "settings": s.__dict__,
        "rows": rows,
        "grid": grid,
        "student": student_dir,
        "few_step_student": few_dir,
        "minutes": round((time.time() - t_start) / 60, 2),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def print_results(result: dict) -> None:
    from ..utils.console import Column, print_table

    cols = [Column("model", wrap=True), Column("stage"), Column("steps", "right")]
    cols += [Column(c, "right") for c in ("denoiser params", "denoiser ms", "colour", "shape", "binding", "spatial")]
    rows = [
        [
            r["model"],
            r.get("stage", ""),
            str(r.get("sample_steps", "")),
            f"{r['params']:,}",
            f"{r['latency_ms']:.1f}",
            *(f"{100 * r[k]:.1f}%" if k in r else "-" for k in ("color", "shape", "binding", "spatial")),
        ]
        for r in result["rows"]
    ]
    print_table(cols, rows, title="koala demo: shapes world, teacher vs KOALA student")
