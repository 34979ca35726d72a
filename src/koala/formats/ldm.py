"""Key maps between diffusers models and the original single-file layout (LDM / SGM: what A1111, ComfyUI and
Stability's own checkpoints use).

Every map is a list of :class:`Rule` objects, one per tensor of the single file, derived from the diffusers
model's own structure (built on ``meta`` from its config): a U-Net with any number of resnets per stage, any
transformer depth, with or without a mid block; a VAE with any number of levels; CLIP and OpenCLIP text towers
of any size. The same rules convert both ways, so ``from_ldm(to_ldm(sd)) == sd`` exactly.

Layouts (SDXL / SD-1.x single files):

- U-Net ``model.diffusion_model.``: ``input_blocks.N`` (conv_in, then one slot per encoder resnet with its
  transformer at ``.1``, one slot per downsampler ``.0.op``), ``middle_block.0/1/2``, ``output_blocks.N`` (one
  slot per decoder resnet; the stage's upsampler sits in its last slot at ``.1.conv``, or ``.2.conv`` after a
  transformer), ``time_embed.0/2``, ``label_emb.0.0/2``, ``out.0/2``.
- VAE ``first_stage_model.``: ``encoder.down.I.block.J``, ``decoder.up.I`` (numbered from the lowest
  resolution up), ``mid.block_1/2``, ``mid.attn_1`` (1x1 convolutions where diffusers has linears).
- CLIP ViT-L ``conditioner.embedders.0.transformer.`` (SDXL) / ``cond_stage_model.transformer.`` (SD-1.x):
  transformers' own names under ``text_model.``.
- OpenCLIP ViT-bigG ``conditioner.embedders.1.model.``: ``transformer.resblocks.N`` with the q/k/v
  projections in one ``attn.in_proj_weight``, ``positional_embedding``, ``ln_final``, ``text_projection``
  (transposed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SD_CLIP_PREFIX = "cond_stage_model.transformer."

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


@dataclass(frozen=True)
class Rule:
    """One tensor of the single file: ``ldm`` is made of the diffusers tensors ``diffusers`` by ``op``:
    '' (the same tensor), 'conv' (a linear weight as a 1x1 convolution), 'T' (transposed), 'cat' (concatenated
    along dim 0: OpenCLIP's fused q/k/v)."""

    ldm: str
    diffusers: tuple[str, ...]
    op: str = ""


def to_ldm(state_dict: dict[str, torch.Tensor], rules: list[Rule], prefix: str = "") -> dict[str, torch.Tensor]:
    """The single-file tensors of a diffusers state dict (keys get ``prefix``)."""
    out = {}
    for r in rules:
        ts = [state_dict[k] for k in r.diffusers]
        if r.op == "cat":
            t = torch.cat(ts, 0)
        elif r.op == "T":
            t = ts[0].t()
        elif r.op == "conv":
            t = ts[0].reshape(*ts[0].shape, *([1] * (4 - ts[0].ndim))) if ts[0].ndim == 2 else ts[0]
        else:
            t = ts[0]
        out[prefix + r.ldm] = t.contiguous()
    return out


def from_ldm(get, rules: list[Rule], shapes: dict[str, tuple], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers state dict from single-file tensors: ``get(key)`` returns the tensor stored under ``key``
    (``prefix`` + rule.ldm); ``shapes`` are the diffusers tensors' shapes (to undo 'conv' and 'cat')."""
    out = {}
    for r in rules:
        t = get(prefix + r.ldm)
        if r.op == "cat":
            sizes = [shapes[k][0] for k in r.diffusers]
            for k, part in zip(r.diffusers, torch.split(t, sizes, 0)):
                out[k] = part.contiguous()
            continue
        if r.op == "T":
            t = t.t().contiguous()
        elif r.op == "conv":
            t = t.reshape(shapes[r.diffusers[0]])
        out[r.diffusers[0]] = t
    return out


def _params(names: list[str], module_prefix: str) -> list[str]:
    p = module_prefix + "."
    return [n[len(p) :] for n in names if n.startswith(p)]


def unet_rules(unet: torch.nn.Module) -> list[Rule]:
    """Rules for a diffusers ``UNet2DConditionModel`` (any structure koala can build), from its modules."""
    names = list(unet.state_dict())
    modules: list[tuple[str, str, dict]] = []  # (diffusers module, ldm module, renames inside)
    for d, ldm in (
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("class_embedding.linear_1", "label_emb.0.0"),
        ("class_embedding.linear_2", "label_emb.0.2"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ):
        modules.append((d, ldm, {}))
    slot = 1
    for i, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            modules.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{slot}.0", _RESNET))
            if attns is not None:
                modules.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{slot}.1", {}))
            slot += 1
        if block.downsamplers is not None:
            modules.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{slot}.0.op", {}))
            slot += 1
    if unet.mid_block is not None:
        modules.append(("mid_block.resnets.0", "middle_block.0", _RESNET))
        if getattr(unet.mid_block, "attentions", None):
            modules.append(("mid_block.attentions.0", "middle_block.1", {}))
            modules.append(("mid_block.resnets.1", "middle_block.2", _RESNET))
        elif len(unet.mid_block.resnets) > 1:
            modules.append(("mid_block.resnets.1", "middle_block.1", _RESNET))
    slot = 0
    for i, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        n = len(block.resnets)
        for j in range(n):
            modules.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{slot}.0", _RESNET))
            if attns is not None:
                modules.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{slot}.1", {}))
            if j == n - 1 and block.upsamplers is not None:
                modules.append(
                    (
                        f"up_blocks.{i}.upsamplers.0.conv",
                        f"output_blocks.{slot}.{2 if attns is not None else 1}.conv",
                        {},
                    )
                )
            slot += 1
    return _module_rules(names, modules, "U-Net")


def _module_rules(names: list[str], modules, what: str, conv: tuple[str, ...] = ()) -> list[Rule]:
    rules, covered = [], set()
    for d, ldm, renames in modules:
        for rest in _params(names, d):
            inner = rest
            for a, b in renames.items():
                if inner == a or inner.startswith(a + "."):
                    inner = b + inner[len(a) :]
                    break
            key = f"{d}.{rest}"
            op = "conv" if conv and any(f".{a}." in f".{rest}" for a in conv) and rest.endswith("weight") else ""
            rules.append(Rule(f"{ldm}.{inner}", (key,), op))
            covered.add(key)
    left = [n for n in names if n not in covered]
    if left:  # a module this layout has no place for: refuse rather than write a file that loses weights
        from ..errors import KoalaError

        raise KoalaError(
            f"the single-file layout has no place for these {what} tensors: {', '.join(left[:5])}"
            f"{' ...' if len(left) > 5 else ''}"
        )
    return rules


def vae_rules(vae: torch.nn.Module) -> list[Rule]:
    """Rules for a diffusers ``AutoencoderKL`` (any number of levels and resnets)."""
    names = list(vae.state_dict())
    modules = []
    for d in (
        "encoder.conv_in",
        "encoder.conv_out",
        "decoder.conv_in",
        "decoder.conv_out",
        "quant_conv",
        "post_quant_conv",
    ):
        modules.append((d, d, {}))
    modules += [("encoder.conv_norm_out", "encoder.norm_out", {}), ("decoder.conv_norm_out", "decoder.norm_out", {})]
    res = {"conv_shortcut": "nin_shortcut"}
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            modules.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", res))
        if block.downsamplers is not None:
            modules.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", {}))
    n = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        for j in range(len(block.resnets)):
            modules.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}", res))
        if block.upsamplers is not None:
            modules.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv", {}))
    for part in ("encoder", "decoder"):
        mid = getattr(vae, part).mid_block
        for j in range(len(mid.resnets)):
            modules.append((f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}", res))
        if mid.attentions is not None and len(mid.attentions) and mid.attentions[0] is not None:
            modules.append((f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN))
    return _module_rules(names, modules, "VAE", conv=("to_q", "to_k", "to_v", "to_out"))


def _text_name(key: str) -> str:
    """transformers' canonical CLIP name of a state-dict key (transformers 5 drops ``text_model.`` from a plain
    ``CLIPTextModel``'s keys; every single file has it)."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def clip_rules(text_encoder: torch.nn.Module) -> list[Rule]:
    """Rules for a CLIP text tower kept in transformers' names (SDXL's first encoder, SD-1.x's only one)."""
    return [Rule(_text_name(k), (k,)) for k in text_encoder.state_dict() if not k.endswith("position_ids")]


def openclip_rules(text_encoder: torch.nn.Module) -> list[Rule]:
    """Rules for a ``CLIPTextModelWithProjection`` stored as an OpenCLIP text tower (SDXL's second encoder)."""
    names = [k for k in text_encoder.state_dict() if not k.endswith("position_ids")]
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    rules, qkv = [], {}
    for k in names:
        c = _text_name(k)
        if c in fixed:
            rules.append(Rule(fixed[c], (k,)))
        elif c == "text_projection.weight":
            rules.append(Rule("text_projection", (k,), "T"))
        elif c.startswith("text_model.encoder.layers."):
            n, rest = c[len("text_model.encoder.layers.") :].split(".", 1)
            base = f"transformer.resblocks.{n}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.rsplit(".", 1)[1]  # weight / bias
                qkv.setdefault((n, kind), {})[rest.split(".")[1]] = k
                continue
            for a, b in _OPENCLIP_LAYER.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
                    break
            else:
                raise ValueError(f"unexpected OpenCLIP text tower tensor {k}")
            rules.append(Rule(base + rest, (k,)))
        else:
            raise ValueError(f"unexpected OpenCLIP text tower tensor {k}")
    for (n, kind), parts in sorted(qkv.items(), key=lambda x: (int(x[0][0]), x[0][1])):
        rules.append(
            Rule(
                f"transformer.resblocks.{n}.attn.in_proj_{kind}",
                tuple(parts[p] for p in ("q_proj", "k_proj", "v_proj")),
                "cat",
            )
        )
    return rules
