"""synCap: synthetic captions from a local vision-language model (KOALA Sec. 3.2, App. A.1: LLaVA-1.5 asked to
"Describe this image in detail"), for any data source.

``caption_source`` writes one JSON line per sample, ``{"key": <the sample's key>, "syncap": <caption>}``, appended and
flushed as each batch finishes, so a killed run resumes where it stopped (samples whose key is already in the file are
skipped). A data config with ``syncap_file: FILE`` joins the captions to the source by key, and the synCap modes
(append, replace, original) combine them with the original captions as for any ``syncap_column``.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import KoalaError
from ..utils.files import append_lines
from ..utils.writes import writing
from .captions import SYNCAP_FIELD, read_syncap_file  # noqa: F401  (read_syncap_file: part of this module's API)

DEFAULT_PROMPT = "Describe this image in detail."


def load_vlm(path: str, device: str = "cpu", dtype=None):
    """(model, processor) of a local image-text-to-text model (LLaVA-1.5 and its family) through transformers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not os.path.isfile(os.path.join(path or "", "config.json")):
        raise KoalaError(
            f"VLM {path}: no config.json; give a local transformers vision-language model directory "
            "(e.g. llava-hf/llava-1.5-7b-hf)",
            option="vlm",
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    except ValueError as err:
        raise KoalaError(
            f"VLM {path}: not an image-text-to-text model ({str(err).splitlines()[0][:200]})", option="vlm"
        ) from None
    return model, AutoProcessor.from_pretrained(path)


def chat_prompt(processor, instruction: str) -> str:
    """The model's own chat template around one image and the instruction, else LLaVA-1.5's format."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}],
            add_generation_prompt=True,
        )
    return f"USER: <image>\n{instruction} ASSISTANT:"


def caption_source(
    data_cfg: dict,
    vlm: str,
    out: str,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 4,
    max_new_tokens: int = 160,
    limit: int | None = None,
    device: str = "cpu",
    dtype=None,
    progress: bool = True,
) -> dict:
    """Caption every sample of a data source with the VLM; resumable. Returns counts."""
    from ..utils.console import progress_bar
    from .config import normalize_data_cfg
    from .images import SkipSample, decode_image
    from .records import iter_split
    from .sources import make_source

    cfg = normalize_data_cfg(dict(data_cfg))
    if cfg["type"] == "cache":
        raise KoalaError(
            "a koala cache holds latents, not images: caption the source it was made from", option="source"
        )
    source = make_source(cfg)
    done = read_syncap_file(out) if os.path.isfile(out) else {}
    model, processor = load_vlm(vlm, device, dtype)
    text = chat_prompt(processor, prompt)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    counts = {"captioned": 0, "already": 0, "skipped": 0}
    skipped: dict[str, int] = {}
    batch: list = []
    total = len(source) if hasattr(source, "__len__") else None

    def flush():
        if not batch:
            return
        inputs = processor(images=[im for _, im in batch], text=[text] * len(batch), return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        caps = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        rows = [json.dumps({"key": key, SYNCAP_FIELD: " ".join(cap.split())}) for (key, _), cap in zip(batch, caps)]
        kept = "the captions written before this batch are kept (the same command resumes from them)"
        with writing(f"captions to {out}", os.path.dirname(os.path.abspath(out)), kept):
            append_lines(out, rows)
        counts["captioned"] += len(batch)
        batch.clear()

    bar = progress_bar(
        total=min(total, limit) if total and limit else total or limit, desc="syncap", unit="img", disable=not progress
    )
    for n, rec in enumerate(iter_split(source)):
        if limit is not None and n >= limit:
            break
        bar.update(1)
        key = str(rec["key"])
        if key in done:
            counts["already"] += 1
            continue
        try:
            img = decode_image(rec["image"])
        except SkipSample as err:
            counts["skipped"] += 1
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
            continue
        batch.append((key, img))
        done[key] = ""
        if len(batch) >= batch_size:
            flush()
    flush()
    bar.close()
    return {**counts, "skip_reasons": skipped, "out": os.path.abspath(out)}
