"""``koala app``: a Gradio page that generates with a teacher and its students side by side.

One column per model: the images (PNG downloads carry ``koala generate``'s metadata), U-Net parameters, latency per
image, peak memory and the sampling settings used; in the shapes world also the shapes scorer's verdict. The queue
runs one request at a time by default (``concurrency``; each model always generates one at a time) and holds up to
``queue_size`` waiting requests; more are refused at once with Gradio's message. Bad input is answered in the
status line above the images.
"""

from __future__ import annotations

import json
import os
import tempfile

from ..errors import KoalaError
from .compare import MAX_IMAGES, MAX_STEPS, ModelSpec, Request, Slot, compare, load_models

STATUS_ID = "koala-status"
STEPS_LABEL = f"steps (1-{MAX_STEPS}; 0 or blank: each model's own, paper 10)"
CFG_LABEL = "guidance scale (0 or blank: each model's own, paper 3.5; 1: no guidance)"


def _own(v):
    """A steps / guidance field: None for "each model's own" (Gradio 6 shows an empty number field as 0 and sends
    0, so 0 means the same as blank)."""
    return None if v in (None, "") or float(v) == 0 else v


def default_specs(demo_dir: str = "koala-demo", log=print) -> list[ModelSpec]:
    """What ships with the package: the shapes teacher, and the ``koala demo`` student if ``demo_dir`` holds one,
    else a freshly compressed (untrained) KOALA-700M student of it, labelled as such."""
    from ..lab.models import shapes_teacher_dir

    teacher = shapes_teacher_dir()
    specs = [ModelSpec("shapes teacher", model=teacher)]
    results = os.path.join(demo_dir, "results.json")
    student = None
    if os.path.isfile(results):
        with open(results) as f:
            student = json.load(f).get("student")
    if student and os.path.isdir(student):
        specs.append(ModelSpec("KOALA-700M student", unet=student, base=teacher, note=f"koala demo: {demo_dir}"))
    else:
        from ..compress import compress

        out = os.path.join(tempfile.mkdtemp(prefix="koala-app-student-"), "koala-700m")
        compress(teacher, "koala-700m", out)
        log(f"no koala demo student under {demo_dir}/: compressed an untrained KOALA-700M student to {out}")
        specs.append(ModelSpec("KOALA-700M student", model=out, note="untrained: freshly compressed, no KD"))
    return specs


def _status(slots: list[Slot]) -> str:
    parts = [
        f"{s.spec.label}: loaded ({s.pipe.device}, {s.pipe.dtype})" if s.ok else f"{s.spec.label}: {s.error}"
        for s in slots
    ]
    return "Models - " + "; ".join(parts)


QUEUE_SIZE = 16  # requests waiting (beyond those running); one more is refused at once
CONCURRENCY = 1  # requests running at once; each model still generates one at a time (Slot.lock)


def check_queue(concurrency: int, queue_size: int) -> None:
    if int(concurrency) < 1:
        raise KoalaError(f"concurrency {concurrency}: must be 1 or more", option="concurrency")
    if int(queue_size) < 1:
        raise KoalaError(f"queue size {queue_size}: must be 1 or more", option="queue_size")


def build_app(
    slots: list[Slot],
    score: bool = False,
    out_dir: str | None = None,
    concurrency: int = CONCURRENCY,
    queue_size: int = QUEUE_SIZE,
):
    """The Gradio Blocks for ``slots`` (already loaded: models load once, at start). Requests wait in Gradio's
    queue, first come first served: ``concurrency`` run at once (each model one at a time), up to ``queue_size``
    wait, and one more is refused at once (the page: "This application is currently busy. Please try again.";
    ``gradio_client``: ``QueueError``); a request its client cancels leaves the queue and frees its place."""
    import gradio as gr

    check_queue(concurrency, queue_size)

    out_dir = out_dir or tempfile.mkdtemp(prefix="koala-app-")
    with gr.Blocks(title="koala: teacher and students side by side") as app:
        gr.Markdown(
            "# koala: teacher and students side by side\n"
            "Same prompt, same seed, each model with its own sampling defaults (a student's recorded ones, "
            "else the paper's: Euler, 10 steps, cfg 3.5, timestep spacing per teacher kind); blank steps / "
            "guidance (shown as 0) use them. " + _status(slots)
        )
        with gr.Row():
            prompt = gr.Textbox(
                label="prompt",
                lines=2,
                elem_id="koala-prompt",
                scale=3,
                value="a red circle to the left of a blue square" if score else "",
            )
            negative = gr.Textbox(label="negative prompt", lines=2, elem_id="koala-negative", scale=2)
        with gr.Row():
            seed = gr.Number(label="seed", value=0, precision=0, elem_id="koala-seed")
            random_seed = gr.Checkbox(label="random seed", value=False, elem_id="koala-random-seed")
            steps = gr.Number(label=STEPS_LABEL, value=None, precision=0, elem_id="koala-steps")
            cfg = gr.Number(label=CFG_LABEL, value=None, elem_id="koala-cfg")
            width = gr.Number(label="width (0: model default)", value=0, precision=0, elem_id="koala-width")
            height = gr.Number(label="height (0: model default)", value=0, precision=0, elem_id="koala-height")
            images = gr.Number(
                label=f"images per prompt (1-{MAX_IMAGES})", value=1, precision=0, elem_id="koala-images"
            )
        button = gr.Button("Generate", variant="primary", elem_id="koala-generate")
        status = gr.Markdown("", elem_id=STATUS_ID)
        outputs = [status]
        with gr.Row():
            for i, slot in enumerate(slots):
                with gr.Column():
                    gallery = gr.Gallery(
                        label=slot.spec.label, elem_id=f"koala-gallery-{i}", columns=2, height="auto", format="png"
                    )
                    stats = gr.Markdown(_status([slot]), elem_id=f"koala-stats-{i}")
                    files = gr.File(
                        label="PNG downloads (with generation metadata)",
                        file_count="multiple",
                        elem_id=f"koala-files-{i}",
                    )
                    outputs += [gallery, stats, files]

        run = _runner(slots, len(outputs), score, out_dir)
        button.click(
            run,
            [prompt, negative, seed, random_seed, steps, cfg, width, height, images],
            outputs,
            concurrency_limit=int(concurrency),
            api_name="generate",
        )
    app.queue(default_concurrency_limit=int(concurrency), max_size=int(queue_size))
    return app


def _runner(slots: list[Slot], n_outputs: int, score: bool, out_dir: str):
    """The button's function: the page's fields in, the status line and per model (gallery, stats, files) out."""
    import gradio as gr

    def run(prompt_v, negative_v, seed_v, random_v, steps_v, cfg_v, width_v, height_v, images_v):
        try:
            req = Request(
                prompt=prompt_v,
                negative_prompt=negative_v or "",
                seed=-1 if random_v else int(seed_v or 0),
                steps=None if _own(steps_v) is None else int(steps_v),
                cfg=None if _own(cfg_v) is None else float(cfg_v),
                width=int(width_v or 0) or None,
                height=int(height_v or 0) or None,
                images=int(images_v or 0),
            )
            results = compare(slots, req, out_dir=tempfile.mkdtemp(dir=out_dir), score=score)
        except (KoalaError, ValueError, TypeError) as err:
            return [f"**Error:** {err}"] + [gr.update()] * (n_outputs - 1)
        seeds = {r.settings.get("seed") for r in results if r.settings}
        values = [f"Done: seed {', '.join(map(str, sorted(seeds)))}"]
        for r in results:
            values += [r.files, r.summary(), r.files]
        return values

    return run


def serve(
    specs: list[ModelSpec],
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    score: bool = False,
    block: bool = True,
    log=print,
    concurrency: int = CONCURRENCY,
    queue_size: int = QUEUE_SIZE,
):
    """Load the models once and start the page; returns the Gradio app (``block=False``: the server runs in a
    background thread until ``app.close()``). ``concurrency`` / ``queue_size``: see :func:`build_app`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_queue(concurrency, queue_size)
    slots = load_models(specs, device=device, dtype=dtype, log=log)
    if not any(s.ok for s in slots):
        raise KoalaError("no model could be loaded: " + "; ".join(f"{s.spec.label}: {s.error}" for s in slots))
    app = build_app(slots, score=score, concurrency=concurrency, queue_size=queue_size)
    app.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=True, inbrowser=False
    )
    return app
