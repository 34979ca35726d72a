"""synCap: synthetic captions from a local vision-language model (KOALA Sec. 3.2, App. A.1: LLaVA-1.5 asked to
"Describe this image in detail"), for any data source.

``caption_source`` writes one JSON line per sample, ``{"key": <the sample's key>, "syncap": <caption>}``, appended and
flushed as each batch finishes, so a killed run resumes where it stopped (samples whose key is already in the file are
skipped). Past one device, process ``rank`` of ``world_size`` (``accelerate launch`` / ``torchrun``, or ``--rank`` /
``--world-size``) captions the samples ``k`` (the position in the source's order) with ``k % world_size == rank``
(every rank reads the whole stream and decodes only its share: reading is cheap next to the VLM) into its own
part, ``OUT-stem.rankR-of-W.jsonl`` beside ``OUT`` (also listing the samples it had to skip); a rank
resumes from every part and ``OUT``. The merge (rank 0 after a barrier when the processes were launched together,
else ``merge_captions`` / ``koala data syncap --merge``) reads the source's keys again (no decoding) and writes
``OUT`` as one process would have written it: the captions in source order, then removes the parts. A data config
with ``syncap_file: FILE`` joins the captions to the source by key, and the synCap modes
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
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Caption every sample (``world_size`` > 1: process ``rank``'s share) of a data source with the VLM; resumable.
    Returns counts (with ``merged``: the merge's counts, where this process merged)."""
    from ..utils.console import progress_bar
    from ..utils.parts import check_rank, launched_together, part_path, part_paths, wait_for_all
    from .images import SkipSample, decode_image
    from .records import iter_split

    check_rank(rank, world_size)
    source = _source(data_cfg)
    done = _read_parts(out)
    model, processor = load_vlm(vlm, device, dtype)
    text = chat_prompt(processor, prompt)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    counts, skipped, batch = {"captioned": 0, "already": 0, "skipped": 0}, {}, []
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
        _append(mine, rows)
        counts["captioned"] += len(batch)
        batch.clear()

    bar = progress_bar(
        total=min(total, limit) if total and limit else total or limit, desc="syncap", unit="img", disable=not progress
    )
    mine, skipped_keys = part_path(out, rank, world_size), set()
    for n, rec in enumerate(iter_split(source)):
        if limit is not None and n >= limit:
            break
        if n % world_size != rank:
            continue
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
            skipped_keys.add(key)
            if world_size > 1:  # so that the merge knows this sample is done with
                _append(mine, [json.dumps({"key": key, SKIPPED: err.reason})])
            continue
        batch.append((key, img))
        done[key] = ""
        if len(batch) >= batch_size:
            flush()
    flush()
    bar.close()
    res = {**counts, "skip_reasons": skipped, "out": os.path.abspath(out)}
    if world_size > 1 and launched_together(world_size):
        wait_for_all("koala data syncap")
        if rank == 0:
            res["merged"] = merge_captions(data_cfg, out, limit)
    elif world_size == 1 and len(part_paths(out)) > int(os.path.isfile(out)):  # it finished what parts began
        res["merged"] = merge_captions(data_cfg, out, limit, skipped_keys)
    return res


SKIPPED = "skipped"  # a part's line for a sample its rank could not read: {"key", "skipped": reason}


def _source(data_cfg: dict):
    from .config import normalize_data_cfg
    from .sources import make_source

    cfg = normalize_data_cfg(dict(data_cfg))
    if cfg["type"] == "cache":
        raise KoalaError(
            "a koala cache holds latents, not images: caption the source it was made from", option="source"
        )
    return make_source(cfg)


def _read_parts(out: str) -> dict[str, str | None]:
    """key -> caption (None: a sample a rank skipped) of ``out`` and of every rank's part of it."""
    from ..utils.files import read_jsonl
    from ..utils.parts import part_paths

    rows = (r for p in part_paths(out) for r in read_jsonl(p) if "key" in r)
    return {str(r["key"]): (None if SKIPPED in r else str(r.get(SYNCAP_FIELD, ""))) for r in rows}


def _append(path: str, rows: list[str]) -> None:
    kept = "the captions written before this batch are kept (the same command resumes from them)"
    with writing(f"captions to {path}", os.path.dirname(os.path.abspath(path)), kept):
        append_lines(path, rows)


def merge_captions(data_cfg: dict, out: str, limit: int | None = None, skipped_keys: set = frozenset()) -> dict:
    """Write ``out`` from itself and every rank's part: the captions in the source's order (its keys read again,
    no image decoded), as one process would have written them; then remove the parts. A sample no part has
    (neither captioned nor skipped; ``skipped_keys``: skipped by the calling process) is refused, naming it: its
    rank has not finished."""
    from ..utils.files import atomic_write_text
    from ..utils.parts import part_paths
    from .records import iter_split

    source, captions = _source(data_cfg), _read_parts(out)
    lines, missing, skipped = [], [], 0
    for n, rec in enumerate(iter_split(source)):
        if limit is not None and n >= limit:
            break
        key = str(rec["key"])
        if key in skipped_keys:
            skipped += 1
        elif key not in captions:
            missing.append(key)
        elif captions[key] is None:
            skipped += 1
        else:
            lines.append(json.dumps({"key": key, SYNCAP_FIELD: captions[key]}) + "\n")
    if missing:
        raise KoalaError(
            f"syncap merge into {out}: {len(missing)} sample(s) are in no part yet (the first: {missing[0]}); a rank "
            "has not finished its share: run it again (it resumes), then merge",
            option="merge",
        )
    parts = [p for p in part_paths(out) if p != out]
    with writing(f"captions to {out}", os.path.dirname(os.path.abspath(out)), "the parts are kept"):
        atomic_write_text(out, "".join(lines))
    for p in parts:
        os.remove(p)
    return {"captions": len(lines), "skipped": skipped, "parts": len(parts), "out": os.path.abspath(out)}
