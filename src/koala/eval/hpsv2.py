"""HPSv2 (Wu et al. 2023): human-preference score of an image for its prompt, as the KOALA paper reports it.

HPSv2 is an OpenCLIP ViT-H/14 fine-tuned on human preferences; its checkpoint (``HPS_v2_compressed.pt`` or
``HPS_v2.1_compressed.pt``) is an open_clip state dict. The score of an image for its own prompt is the cosine of
the L2-normalised image and text embeddings (HPSv2's ``score`` takes the diagonal of ``image @ text.T``, no logit
scale); koala reports it x100, as the paper's tables do.

How koala runs it (differs from the ``hpsv2`` package, same numbers by construction): open_clip needs torchvision,
which cannot run beside a CPU-only torch build, so the checkpoint is converted to a transformers ``CLIPModel``
(the architecture is read from the tensors: widths, depths, patch size, image size; heads = width / 64 as in
open_clip's ViTs) and run there. Images are preprocessed as open_clip's validation transform does (shortest side
to 224 bicubic, centre crop, OpenAI mean / std), prompts are tokenized with the CLIP BPE tokenizer (any CLIP
tokenizer directory, e.g. an SDXL pipeline's ``tokenizer/``) to 77 tokens; the text embedding is taken at the
end-of-text token, as open_clip does.
"""

from __future__ import annotations

import os

import torch

from ..errors import KoalaError

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
ACTS = ("gelu", "quick_gelu")


def load_openclip_state(path: str) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict from ``.pt`` (tensors and plain values only:
    :func:`koala.utils.weights.load_tensor_file`; ``state_dict`` key or plain, DDP's ``module.`` stripped) or
    ``.safetensors``."""
    if not os.path.isfile(path):
        raise KoalaError(
            f"HPSv2 checkpoint {path}: no such file (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)",
            option="checkpoint",
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        from ..utils.weights import check_safetensors

        check_safetensors(path)
        sd = load_file(path)
    else:
        from ..utils.weights import load_tensor_file

        try:
            obj = load_tensor_file(path, f"HPSv2 checkpoint {path}")
        except KoalaError as err:
            raise KoalaError(str(err), option="checkpoint") from None
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise KoalaError(f"HPSv2 checkpoint {path}: expected a state dict", option="checkpoint")
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    need = ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection")
    missing = [k for k in need if k not in sd]
    if missing:
        raise KoalaError(
            f"HPSv2 checkpoint {path}: not an open_clip ViT CLIP (missing {', '.join(missing)})", option="checkpoint"
        )
    return sd


def _count(sd: dict, fmt: str) -> int:
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def clip_config_from_openclip(sd: dict, act: str = "gelu"):
    """A transformers ``CLIPConfig`` with the architecture of an open_clip ViT state dict."""
    from transformers import CLIPConfig

    if act not in ACTS:
        raise KoalaError(f"activation {act!r}: choose {' or '.join(ACTS)}", option="act")
    vw, _, patch, _ = sd["visual.conv1.weight"].shape
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = int(round((n_pos - 1) ** 0.5))
    tw = sd["token_embedding.weight"].shape[1]
    vision = dict(
        hidden_size=vw,
        intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count(sd, "visual.transformer.resblocks.{}.ln_1.weight"),
        num_attention_heads=max(1, vw // 64),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act=act,
        projection_dim=sd["visual.proj"].shape[1],
    )
    text = dict(
        hidden_size=tw,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count(sd, "transformer.resblocks.{}.ln_1.weight"),
        num_attention_heads=max(1, tw // 64),
        vocab_size=sd["token_embedding.weight"].shape[0],
        max_position_embeddings=sd["positional_embedding"].shape[0],
        hidden_act=act,
        projection_dim=sd["text_projection"].shape[1],
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["text_projection"].shape[1])


_VISION_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def openclip_to_transformers(sd: dict, act: str = "gelu", heads: int | None = None):
    """``CLIPModel`` with the weights of an open_clip ViT CLIP state dict (``heads`` overrides width / 64 for both
    towers, for architectures that differ)."""
    from transformers import CLIPModel, CLIPTextModelWithProjection

    from ..formats.ldm import from_ldm, openclip_rules

    cfg = clip_config_from_openclip(sd, act)
    if heads:
        cfg.text_config.num_attention_heads = cfg.vision_config.num_attention_heads = heads
    with torch.device("meta"):
        model = CLIPModel(cfg)
        text = CLIPTextModelWithProjection(cfg.text_config)
    out = {}
    # the text tower: the same key map as SDXL's OpenCLIP-bigG text encoder
    t_shapes = {k: tuple(v.shape) for k, v in text.state_dict().items()}
    try:
        out.update(from_ldm(sd.__getitem__, openclip_rules(text), t_shapes))
    except KeyError as err:
        raise KoalaError(f"HPSv2 checkpoint: text tower tensor {err} missing", option="checkpoint") from None
    out = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in out.items()}
    v = "vision_model."
    out[v + "embeddings.class_embedding"] = sd["visual.class_embedding"]
    out[v + "embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out[v + "embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"{v}{b}.{p}"] = sd[f"visual.{a}.{p}"]
    out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    w = cfg.vision_config.hidden_size
    for n in range(cfg.vision_config.num_hidden_layers):
        src, dst = f"visual.transformer.resblocks.{n}.", f"{v}encoder.layers.{n}."
        for p in ("weight", "bias"):
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{dst}self_attn.{proj}.{p}"] = sd[f"{src}attn.in_proj_{p}"][i * w : (i + 1) * w].contiguous()
            for a, b in _VISION_LAYER.items():
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
    out["logit_scale"] = sd.get("logit_scale", torch.tensor(4.6052))
    res = model.load_state_dict(out, strict=False, assign=True)
    left = [k for k in res.missing_keys if not k.endswith("position_ids")]
    if left or res.unexpected_keys:
        raise KoalaError(
            f"HPSv2 checkpoint: does not map onto CLIP (missing {left[:3]}, unexpected {res.unexpected_keys[:3]})",
            option="checkpoint",
        )
    from ..utils.weights import materialize_meta_buffers

    return materialize_meta_buffers(model).float().eval()  # non-persistent position ids


def load_tokenizer(path: str):
    """A CLIP tokenizer from a tokenizer directory or a pipeline directory (its ``tokenizer/``)."""
    from transformers import CLIPTokenizer

    if path and os.path.isdir(os.path.join(path, "tokenizer")):
        path = os.path.join(path, "tokenizer")
    if not path or not os.path.isdir(path):
        raise KoalaError(
            f"HPSv2 tokenizer {path}: give a CLIP tokenizer directory (e.g. an SDXL pipeline or its "
            "tokenizer/ folder: the same CLIP BPE open_clip uses)",
            option="tokenizer",
        )
    return CLIPTokenizer.from_pretrained(path)


def image_processor(size: int):
    """open_clip's validation transform for a ``size`` model: shortest side bicubic, centre crop, OpenAI stats."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,
        image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD,
        do_convert_rgb=True,
    )


class HPSv2:
    """``HPSv2(checkpoint, tokenizer).scores(images, prompts)`` -> HPSv2 x100 per (image, prompt)."""

    def __init__(self, checkpoint: str, tokenizer: str, device: str = "cpu", act: str = "gelu"):
        self.model = openclip_to_transformers(load_openclip_state(checkpoint), act).to(device)
        self.tokenizer = load_tokenizer(tokenizer)
        self.processor = image_processor(self.model.config.vision_config.image_size)
        self.device = device

    @torch.no_grad()
    def scores(self, images: list, prompts: list[str], batch_size: int = 16) -> list[float]:
        if len(images) != len(prompts):
            raise KoalaError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        ctx = self.model.config.text_config.max_position_embeddings
        for i in range(0, len(images), batch_size):
            pix = self.processor(images=images[i : i + batch_size], return_tensors="pt")["pixel_values"].to(
                self.device
            )
            ids = self.tokenizer(
                prompts[i : i + batch_size], padding="max_length", max_length=ctx, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            img = self.model.get_image_features(pixel_values=pix)
            txt = self.model.get_text_features(input_ids=ids)
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            img = torch.nn.functional.normalize(img.float(), dim=-1)
            txt = torch.nn.functional.normalize(txt.float(), dim=-1)
            out += (100 * (img * txt).sum(-1)).tolist()
        return out


def score_folder(
    folder: str, checkpoint: str, tokenizer: str, device: str = "cpu", limit: int | None = None, act: str = "gelu"
) -> dict:
    """HPSv2 x100 of every (image, prompt) of ``folder`` (prompts and optional ``style`` from metadata.jsonl, or
    PNG prompt chunks); per-style means and their average. Unreadable images are skipped and counted."""
    import json

    from .folder import read_prompted_images

    styles = {}
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        with open(meta) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    styles[os.path.join(folder, row["file_name"])] = row.get("style", "all")
    scorer = HPSv2(checkpoint, tokenizer, device, act)
    data = read_prompted_images(folder, limit)
    images, prompts, skipped = data.images, data.prompts, data.skipped
    names = [os.path.join(folder, n) for n in data.names]
    scores = scorer.scores(images, prompts)
    by_style: dict[str, list[float]] = {}
    for n, s in zip(names, scores):
        by_style.setdefault(styles.get(n, "all"), []).append(s)
    per_style = {st: {"hpsv2": sum(v) / len(v), "n_images": len(v)} for st, v in sorted(by_style.items())}
    return {
        "schema": "koala-eval-hpsv2/1",
        "folder": folder,
        "checkpoint": checkpoint,
        "hpsv2": sum(v["hpsv2"] for v in per_style.values()) / len(per_style),
        "n_images": len(scores),
        "styles": per_style,
        "skipped": skipped,
        "per_image": [
            {"file_name": os.path.relpath(n, folder), "style": styles.get(n, "all"), "text": t, "hpsv2": s}
            for n, t, s in zip(names, prompts, scores)
        ],
    }
