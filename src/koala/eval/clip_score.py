"""CLIP score of generated images against their prompts, from a local transformers CLIP checkpoint.

Definition (Hessel et al. 2021, as torchmetrics' ``CLIPScore`` computes it): ``100 * max(cos(E_img, E_txt), 0)``
with the CLIP model's projected image and text embeddings, the text truncated to the model's 77 tokens. The paper's
T2I-CompBench "non-spatial" category is this score with CLIP ViT-B/32 (``openai/clip-vit-base-patch32``); any CLIP
checkpoint directory works (``CLIPModel.from_pretrained(DIR)``, no download).

Prompts come from the folder's ``metadata.jsonl`` or each PNG's ``prompt`` chunk (what ``koala generate`` writes).
An image that cannot be read is skipped and counted, never scored as zero.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import KoalaError
from ..utils.console import markdown_table

SCHEMA = "koala-eval-clip/1"


def check_model_dir(path: str, what: str, kinds, example: str, option: str | None = None) -> dict:
    """The config of a local transformers model directory whose ``model_type`` is one of ``kinds``; else a KoalaError
    naming the directory and the field."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    cfg_path = os.path.join(path or "", "config.json")
    if not path or not os.path.isfile(cfg_path):
        raise KoalaError(
            f"{what} {path}: no config.json; give a local transformers directory ({example})", option=option
        )
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("model_type") not in kinds:
        raise KoalaError(
            f"{what} {path}: config.json field model_type is {cfg.get('model_type')!r}, not "
            f"{' or '.join(map(repr, kinds))}",
            option=option,
        )
    return cfg


def load_clip(path: str, device: str | torch.device = "cpu", processor: str | None = None):
    """``(CLIPModel, CLIPProcessor)`` from a local directory (the processor from ``processor`` when given); a clear
    error for a missing or non-CLIP one."""
    from transformers import CLIPModel, CLIPProcessor

    check_model_dir(path, "CLIP checkpoint", "clip", "e.g. a download of openai/clip-vit-base-patch32", "checkpoint")
    model = CLIPModel.from_pretrained(path).to(device).eval()
    proc_dir = processor or path
    try:
        return model, CLIPProcessor.from_pretrained(proc_dir)
    except (OSError, ValueError) as err:
        raise KoalaError(
            f"CLIP processor {proc_dir}: cannot load the tokenizer / image processor ({str(err)[:200]}); "
            "give the directory of the model's processor",
            option="checkpoint",
        ) from None


def clip_scores(images: list, prompts: list[str], model, processor, batch_size: int = 16) -> list[float]:
    """One CLIP score, ``100 * max(cos, 0)``, per (PIL image, prompt) pair."""
    return [100 * max(c, 0.0) for c in clip_cosines(images, prompts, model, processor, batch_size)]


@torch.no_grad()
def clip_cosines(images: list, prompts: list[str], model, processor, batch_size: int = 16) -> list[float]:
    """The cosine of the CLIP image and text embeddings per (PIL image, prompt) pair (T2I-CompBench's non-spatial
    score)."""
    if len(images) != len(prompts):
        raise KoalaError(f"{len(images)} images but {len(prompts)} prompts")
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(images), batch_size):
        inputs = processor(
            text=prompts[i : i + batch_size],
            images=images[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=model.config.text_config.max_position_embeddings,
        )
        inputs = {k: v.to(device) for k, v in inputs.items()}
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        out += torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).tolist()
    return out


def score_folder(
    folder: str, checkpoint: str, device: str = "cpu", batch_size: int = 16, limit: int | None = None
) -> dict:
    """CLIP score of every (image, prompt) of ``folder``; JSON-ready (schema ``koala-eval-clip/1``)."""
    from .folder import read_prompted_images

    data = read_prompted_images(folder, limit)
    model, processor = load_clip(checkpoint, device)
    images, prompts, names, skipped = data.images, data.prompts, data.names, data.skipped
    scores = clip_scores(images, prompts, model, processor, batch_size)
    return {
        "schema": SCHEMA,
        "folder": folder,
        "checkpoint": checkpoint,
        "clip_score": sum(scores) / len(scores),
        "n_images": len(scores),
        "skipped": skipped,
        "per_image": [{"file_name": n, "text": t, "clip_score": s} for n, t, s in zip(names, prompts, scores)],
    }


def markdown(result: dict) -> str:
    skip = f", {len(result['skipped'])} unreadable skipped" if result["skipped"] else ""
    row = [result["folder"], f"{result['clip_score']:.2f}", f"{result['n_images']}{skip}"]
    return markdown_table(["folder", "CLIP score", "images"], [row]) + "\n"


def pick_scores(images: list, prompts: list[str], model, processor, batch_size: int = 16) -> list[float]:
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cos(image, text)`` of the PickScore CLIP model (a
    transformers CLIP, yuvalkirstain/PickScore_v1, with the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    scale = float(model.logit_scale.exp())
    return [scale * c for c in clip_cosines(images, prompts, model, processor, batch_size)]


def pickscore_folder(
    folder: str,
    checkpoint: str,
    processor: str | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    limit: int | None = None,
) -> dict:
    """PickScore of every (image, prompt) of ``folder``; JSON-ready (schema ``koala-eval-pickscore/1``)."""
    from .folder import read_prompted_images

    data = read_prompted_images(folder, limit)
    model, proc = load_clip(checkpoint, device, processor)
    scores = pick_scores(data.images, data.prompts, model, proc, batch_size)
    return {
        "schema": "koala-eval-pickscore/1",
        "folder": folder,
        "checkpoint": checkpoint,
        "pickscore": sum(scores) / len(scores),
        "n_images": len(scores),
        "skipped": data.skipped,
        "per_image": [
            {"file_name": n, "text": t, "pickscore": v} for n, t, v in zip(data.names, data.prompts, scores)
        ],
    }
