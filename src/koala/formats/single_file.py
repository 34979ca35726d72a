"""Single-file checkpoints (the original LDM / SGM layout of A1111, ComfyUI and Stability's releases), both ways.

``export_single_file``: a diffusers pipeline (a KOALA student, a teacher) or a U-Net directory -> one
``.safetensors`` file, with the key maps of :mod:`koala.formats.ldm` derived from the model's own structure.
It loads back with diffusers' ``from_single_file(config=STUDENT_DIR)``; ComfyUI detects KOALA-700M / -1B from
its transformer depths.

``single_file_to_diffusers``: an SDXL (or, with a config directory, SD-1.x) single file -> a diffusers pipeline
directory, offline. The U-Net's structure (resnets per stage, transformer depths, mid block, widths) is read from
the file itself, so a KOALA single file converts as well as an SDXL fine-tune; what a file cannot tell (attention
heads, the text towers' and VAE's configs, tokenizers, scheduler) comes from ``config`` (any pipeline directory
of the same architecture) or, for SDXL, from the SDXL-Base-1.0 configs koala ships, with tokenizers found in
the local Hugging Face cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..arch.config import public_config
from ..errors import KoalaError
from ..utils.devices import parse_dtype
from ..utils.files import read_json, refuse_existing
from ..utils.weights import check_user_safetensors, materialize_meta_buffers, safetensors_header
from .ldm import (
    SD_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_rules,
    from_ldm,
    openclip_rules,
    to_ldm,
    unet_rules,
    vae_rules,
)

if TYPE_CHECKING:
    from ..families import Family

FORMATS = ("single-file", "diffusers", "onnx")  # koala export --format (onnx: koala.formats.onnx)

# the text encoders' key prefixes in each original single-file layout (Family.single_file_layout)
_TEXT_ENCODER_PREFIXES = {
    "sgm": (("text_encoder", SDXL_CLIP_PREFIX), ("text_encoder_2", SDXL_OPENCLIP_PREFIX)),
    "ldm": (("text_encoder", SD_CLIP_PREFIX),),
}


# ----------------------------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    out: str
    family: str
    components: dict[str, int]  # component -> tensors written
    bytes: int
    dtype: str


def _component_prefixes(fam: Family) -> list[tuple[str, str]]:
    """(component, key prefix) of every component a single file of the family holds, the U-Net first."""
    return [("unet", UNET_PREFIX), ("vae", VAE_PREFIX), *_TEXT_ENCODER_PREFIXES[fam.single_file_layout]]


def _family_of_layout(layout: str) -> Family:
    """The family whose single files are in ``layout`` ("sgm" / "ldm")."""
    from ..families import FAMILIES

    return next(f for f in FAMILIES.values() if f.single_file_layout == layout)


def _rules_for(name: str, module):
    if name == "unet":
        return unet_rules(module)
    if name == "vae":
        return vae_rules(module)
    if name == "text_encoder_2":
        return openclip_rules(module)
    return clip_rules(module)


def _load_component(pipeline_dir: str, name: str, dtype):
    import diffusers
    import transformers

    cfg = read_json(os.path.join(pipeline_dir, name, "config.json"))
    if name in ("unet", "vae"):
        return getattr(diffusers, cfg.get("_class_name", "AutoencoderKL")).from_pretrained(
            pipeline_dir, subfolder=name, dtype=dtype
        )
    arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
    return getattr(transformers, arch).from_pretrained(pipeline_dir, subfolder=name, dtype=dtype)


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(folder: str) -> torch.dtype | None:
    """The floating dtype a component folder's safetensors weights are stored in (None when there are none)."""
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            header = safetensors_header(os.path.join(folder, name))
            for k, v in header.items():
                if k != "__metadata__" and v["dtype"] in _ST_DTYPES:
                    return _ST_DTYPES[v["dtype"]]
    return None


def export_single_file(
    src: str, out: str, *, base: str | None = None, dtype=None, unet_only: bool = False, overwrite: bool = False
) -> ExportResult:
    """Write ``src`` (a pipeline directory, or a U-Net directory with ``base`` supplying VAE and text encoders,
    or with ``unet_only``) as one original-layout safetensors file at ``out``, atomically."""
    from safetensors.torch import save_file

    from ..utils.files import atomic_file

    if not out.endswith(".safetensors"):
        raise KoalaError(
            f"{out}: a single-file checkpoint is written as .safetensors; name the output *.safetensors", option="out"
        )
    refuse_existing(out, overwrite, "file")
    fam, pipe_dir = _export_source(src, base, unet_only)
    tensors, counts = _single_file_tensors(src, pipe_dir, fam, parse_dtype(dtype), unet_only)
    with atomic_file(out, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=_export_metadata(src, fam, counts))
    some = next(iter(tensors.values()))
    return ExportResult(
        os.path.abspath(out), fam.name, counts, os.path.getsize(out), str(some.dtype).replace("torch.", "")
    )


def _export_source(src: str, base: str | None, unet_only: bool) -> tuple[Family, str | None]:
    """The family of ``src`` (one with a single-file layout) and the pipeline directory its VAE and text encoders
    come from (None with ``unet_only``), checked."""
    from ..families import FAMILIES, family_of, model_dir_kind

    kind = model_dir_kind(src)
    fam = family_of(src)
    if fam.single_file_layout is None:
        covered = ", ".join(f.name for f in FAMILIES.values() if f.single_file_layout)
        raise KoalaError(
            f"{src}: single-file export covers the U-Net families ({covered}); a {fam.label} model has no "
            "LDM/SGM single-file layout here (export it with --format diffusers)"
        )
    pipe_dir = src if kind == "pipeline" else base
    if not unet_only:
        if pipe_dir is None:
            raise KoalaError(
                f"{src} is a U-Net directory: give the pipeline it belongs to (base) for the VAE and text "
                "encoders, or export the U-Net alone (unet_only)",
                option="base",
            )
        fam.check_pipeline_dir(pipe_dir, "base" if kind != "pipeline" else "model")
    return fam, pipe_dir


def _single_file_tensors(src: str, pipe_dir: str | None, fam: Family, dt, unet_only: bool):
    """``(tensors, counts)``: every component's tensors under their single-file keys, in ``dt`` when given (else
    each component as it is stored), and the number of tensors per component."""
    from ..families import model_dir

    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for name, prefix in _component_prefixes(fam):
        if unet_only and name != "unet":
            continue
        if name == "unet":
            module = fam.load_model(model_dir(src), dt or stored_dtype(model_dir(src)))
        else:
            module = _load_component(pipe_dir, name, dt or stored_dtype(os.path.join(pipe_dir, name)))
        part = to_ldm(module.state_dict(), _rules_for(name, module), prefix)
        counts[name] = len(part)
        tensors.update(part)
        del module
    if dt is not None:
        tensors = {k: v.to(dt) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors, counts


def _export_metadata(src: str, fam: Family, counts: dict[str, int]) -> dict[str, str]:
    """The single file's safetensors metadata: title, family, components and, for a koala student, its layer map
    (so a conversion back restores it) and its sampling defaults (``koala.sampling``, when recorded)."""
    from ..arch.layer_map import LayerMap
    from ..families import model_dir

    meta = {
        "format": "pt",
        "modelspec.title": os.path.basename(os.path.normpath(src)),
        "koala.family": fam.name,
        "koala.components": ",".join(counts),
    }
    lmap_path = LayerMap.find(model_dir(src))
    if lmap_path:
        lm = LayerMap.load(lmap_path)
        meta["koala.preset"] = str(lm.meta.get("preset") or "custom")
        meta["koala.teacher_kind"] = str(lm.meta.get("teacher_kind", "base"))
        if "sampling" in lm.meta:  # how the student is sampled (koala.families.sampling.SamplingDefaults)
            meta["koala.sampling"] = json.dumps(lm.meta["sampling"], sort_keys=True)
        meta["koala.layer_map"] = json.dumps(lm.to_dict())
    return meta


def export_diffusers(src: str, out_dir: str, *, dtype=None, overwrite: bool = False) -> str:
    """Rewrite a pipeline or model directory (any family) in diffusers' directory format, in ``dtype`` when given,
    keeping koala's layer map and model card; atomically."""
    import shutil

    from ..families import family_of, model_dir_kind
    from ..utils.files import atomic_output_dir

    kind = model_dir_kind(src)
    fam = family_of(src)
    dt = parse_dtype(dtype)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        if kind == "pipeline":
            fam.check_pipeline_dir(src, "model")
            cls = fam.pipeline_class_of(src)
            if dt is None:  # every component as it is stored (an fp16 U-Net beside an fp32 VAE stays so)
                stored = {
                    c: stored_dtype(os.path.join(src, c))
                    for c in read_json(os.path.join(src, "model_index.json"))
                    if not c.startswith("_")
                }
                dt_arg = {"default": torch.float32, **{c: d for c, d in stored.items() if d is not None}}
            else:
                dt_arg = dt
            pipe = cls.from_pretrained(src, **fam.pipeline_load_kwargs, dtype=dt_arg)
            pipe.save_pretrained(tmp, safe_serialization=True)
        else:
            fam.load_model(src, dt or stored_dtype(src)).save_pretrained(tmp, safe_serialization=True)
        for sub in ("", fam.model_subfolder):  # koala's own files, which diffusers does not know
            for name in ("koala_layer_map.json", "README.md"):
                f = os.path.join(src, sub, name)
                if os.path.isfile(f) and os.path.isdir(os.path.join(tmp, sub)):
                    shutil.copy2(f, os.path.join(tmp, sub, name))
    return os.path.abspath(out_dir)


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class Layout:
    """What a single file holds: ``family`` (sdxl / sd), ``unet_prefix``, the components present."""

    family: str
    unet_prefix: str
    components: list[str]
    shapes: dict[str, tuple] = field(repr=False, default_factory=dict)
    metadata: dict[str, str] = field(repr=False, default_factory=dict)  # the file's safetensors metadata


def read_header(path: str) -> tuple[dict[str, tuple], dict[str, str]]:
    """(key -> shape, metadata) of a safetensors file, from its header only."""
    from safetensors import safe_open

    check_user_safetensors(path, "single-file checkpoints")
    with safe_open(path, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        meta = f.metadata() or {}
    return shapes, meta


_OTHER_FAMILIES = (
    ("double_blocks.", "a FLUX model"),
    ("joint_blocks.", "an SD3 model"),
    ("cond_stage_model.model.", "an SD-2.x model (OpenCLIP-H text encoder)"),
    ("conditioner.embedders.0.model.", "an SDXL refiner (OpenCLIP-G only)"),
    ("transformer_blocks.0.attn.add_q_proj", "an MM-DiT model"),
    ("pos_embed", "a DiT model"),
)


def detect_layout(path: str) -> Layout:
    """The family and layout of a single file, from its keys; a KoalaError naming the file otherwise."""
    shapes, meta = read_header(path)
    keys = list(shapes)
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    if has(UNET_PREFIX):
        prefix = UNET_PREFIX
    elif "input_blocks.0.0.weight" in shapes:
        prefix = ""
    elif "conv_in.weight" in shapes and has("down_blocks."):
        raise KoalaError(
            f"{path}: a U-Net in diffusers' key layout (like SDXL-Lightning's U-Net file), not a "
            "single-file checkpoint; use it as the teacher's U-Net (teacher_unet) with a pipeline"
        )
    else:
        what = next((name for p, name in _OTHER_FAMILIES if any(p in k for k in keys)), None)
        raise KoalaError(
            f"{path}: not an SDXL or SD-1.x single-file checkpoint"
            + (
                f" (it looks like {what})"
                if what
                else f" (no {UNET_PREFIX}* U-Net keys; first keys: {', '.join(keys[:3])})"
            )
        )
    if has("cond_stage_model.model.") or has("conditioner.embedders.0.model."):
        what = next(name for p, name in _OTHER_FAMILIES if has(p))
        raise KoalaError(f"{path}: {what}, not SDXL or SD-1.x; koala converts SDXL and SD-1.x single files")
    # SGM (SDXL): its text encoders' keys, or (a U-Net alone) the U-Net's added-condition embedding; else LDM
    sgm = has(SDXL_OPENCLIP_PREFIX) or has(SDXL_CLIP_PREFIX) or f"{prefix}label_emb.0.0.weight" in shapes
    fam = _family_of_layout("sgm" if sgm else "ldm")
    comps = ["unet", *(c for c, p in _component_prefixes(fam)[1:] if has(p))]
    return Layout(fam.name, prefix, comps, shapes, metadata=meta)


def _count(shapes, pattern: str) -> int:
    n = 0
    while any(k.startswith(pattern.format(n)) for k in shapes):
        n += 1
    return n


def _depth(shapes, blk: str) -> int:
    return _count(shapes, blk + "1.transformer_blocks.{}.") if f"{blk}1.proj_in.weight" in shapes else 0


def infer_unet_config(shapes: dict[str, tuple], base: dict, prefix: str = UNET_PREFIX, where: str = "") -> dict:
    """A diffusers U-Net config with the structure of the single-file U-Net whose (key -> shape) are ``shapes``:
    resnets per stage, transformer depths (encoder, decoder per resnet), mid block, widths and conditioning
    sizes come from the tensors; attention heads and the rest from ``base`` (a config of the same architecture).
    """
    p = prefix
    if f"{p}input_blocks.0.0.weight" not in shapes:
        raise KoalaError(f"{where}: no {p}input_blocks.0.0.weight: not a U-Net single file")
    ch0 = shapes[f"{p}input_blocks.0.0.weight"][0]
    stages, widths = _encoder_stages(shapes, p, where)
    up = _decoder_stages(shapes, p)
    _check_stages(stages, up, where)
    mid = _mid_block_type(shapes, p, where)
    cfg = _base_config(base, widths, len(stages), where)
    lpb = [len(s) for s in stages]
    cfg.update(
        {
            "block_out_channels": widths,
            "in_channels": shapes[f"{p}input_blocks.0.0.weight"][1],
            "out_channels": shapes.get(f"{p}out.2.weight", (4,))[0],
            "down_block_types": ["CrossAttnDownBlock2D" if any(s) else "DownBlock2D" for s in stages],
            "up_block_types": ["CrossAttnUpBlock2D" if any(u) else "UpBlock2D" for u in up],
            "layers_per_block": lpb[0] if len(set(lpb)) == 1 else lpb,
            "transformer_layers_per_block": [max(s[0], 1) for s in stages],
            "reverse_transformer_layers_per_block": [[max(d, 1) for d in u] for u in up],
            "mid_block_type": mid,
        }
    )
    if ch0 != widths[0]:
        raise KoalaError(f"{where}: conv_in width {ch0} differs from the first stage's {widths[0]}")
    cfg.update(_conditioning_sizes(shapes, p))
    return cfg


def _encoder_stages(shapes, p: str, where: str) -> tuple[list[list[int]], list[int]]:
    """(transformer depth of each encoder resnet, per stage; each stage's width), from the ``input_blocks``."""
    stages: list[list[int]] = [[]]
    widths: list[int] = []
    for n in range(1, _count(shapes, p + "input_blocks.{}.")):
        blk = f"{p}input_blocks.{n}."
        if f"{blk}0.op.weight" in shapes:
            stages.append([])
            continue
        if f"{blk}0.in_layers.0.weight" not in shapes:
            raise KoalaError(f"{where}: input block {n} is neither a resnet nor a downsampler")
        stages[-1].append(_depth(shapes, blk))
        w = shapes[f"{blk}0.out_layers.3.weight"][0]
        if len(widths) < len(stages):
            widths.append(w)
    return stages, widths


def _decoder_stages(shapes, p: str) -> list[list[int]]:
    """The transformer depth of each decoder resnet, per stage (lowest resolution first), from the
    ``output_blocks``."""
    up: list[list[int]] = [[]]
    for n in range(_count(shapes, p + "output_blocks.{}.")):
        blk = f"{p}output_blocks.{n}."
        up[-1].append(_depth(shapes, blk))
        if f"{blk}1.conv.weight" in shapes or f"{blk}2.conv.weight" in shapes:
            up.append([])
    if up and not up[-1]:
        up.pop()
    return up


def _check_stages(stages: list[list[int]], up: list[list[int]], where: str) -> None:
    """The decoder mirrors the encoder (one resnet more per stage) and each encoder stage has one depth."""
    if len(up) != len(stages) or any(len(u) != len(s) + 1 for u, s in zip(up, reversed(stages))):
        raise KoalaError(
            f"{where}: decoder stages {[len(u) for u in up]} resnets do not mirror the encoder's "
            f"{[len(s) for s in stages]} (+1 each): not a U-Net koala can express"
        )
    for i, s in enumerate(stages):
        if len(set(s)) > 1:
            raise KoalaError(
                f"{where}: encoder stage {i + 1} has transformer depths {s}; diffusers needs one depth per "
                "encoder stage"
            )


def _mid_block_type(shapes, p: str, where: str) -> str | None:
    if f"{p}middle_block.1.proj_in.weight" in shapes:
        return "UNetMidBlock2DCrossAttn"
    if f"{p}middle_block.0.in_layers.0.weight" in shapes:
        raise KoalaError(f"{where}: a mid block of resnets without attention (SSD-1B / Vega style) is not supported")
    return None


def _base_config(base: dict, widths: list[int], n: int, where: str) -> dict:
    """A copy of ``base`` without diffusers' private keys, its per-stage lists cut to ``n`` stages; a KoalaError
    when its widths are not the file's (attention heads cannot be read from the weights)."""
    cfg = public_config(base)
    base_widths = list(base.get("block_out_channels", []))
    if widths != base_widths[:n]:
        raise KoalaError(
            f"{where}: U-Net widths {widths} differ from the config's {base_widths}; give a config "
            "directory of this architecture (its attention heads cannot be read from the weights)",
            option="config",
        )
    per_stage = ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention")
    for k in per_stage:
        if isinstance(cfg.get(k), (list, tuple)):
            cfg[k] = list(cfg[k])[:n]
    return cfg


def _conditioning_sizes(shapes, p: str) -> dict:
    """The config's text and added-condition sizes the file's tensors tell."""
    out = {}
    attn2 = next((s for k, s in shapes.items() if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    if attn2 is not None:
        out["cross_attention_dim"] = attn2[1]
    proj = next((s for k, s in shapes.items() if k.startswith(p) and k.endswith(".1.proj_in.weight")), None)
    if proj is not None:
        out["use_linear_projection"] = len(proj) == 2
    if f"{p}label_emb.0.0.weight" in shapes:
        out["projection_class_embeddings_input_dim"] = shapes[f"{p}label_emb.0.0.weight"][1]
    return out


@dataclass
class Converted:
    """A single file turned into diffusers modules: ``modules`` (component -> module), ``layout``, ``configs``
    (component -> the config used), ``ignored`` keys of the file no component took."""

    layout: Layout
    modules: dict
    ignored: list[str]
    config_source: str


def _shipped_configs(family: str | Family) -> dict[str, dict]:
    """The configs a single file of ``family`` is converted with when no config directory is given."""
    from ..families import get_family

    fam = get_family(family)
    configs = fam.reference_pipeline_configs()
    if not configs:
        raise KoalaError(
            f"{fam.label} single files need a config directory (any {fam.label} pipeline directory: its configs "
            "and tokenizers are used, not its weights)",
            option="config",
        )
    return configs


def _config_dir_configs(config: str, fam: Family) -> dict[str, dict]:
    """Component -> config of a config directory (a model directory: the U-Net's only)."""
    from ..families import model_dir_kind

    if model_dir_kind(config) == "model":
        return {"unet": read_json(os.path.join(config, "config.json"))}
    out = {}
    for name, _ in _component_prefixes(fam):
        f = os.path.join(config, name, "config.json")
        if os.path.isfile(f):
            out[name] = read_json(f)
    f = os.path.join(config, "scheduler", "scheduler_config.json")
    if os.path.isfile(f):
        out["scheduler"] = read_json(f)
    return out


def _component_configs(path: str, config: str | None, layout: Layout, fam: Family) -> dict[str, dict]:
    """Component -> config to convert the single file ``path`` with: the config directory's, completed by the
    family's shipped configs when the directory gives at most one."""
    configs = _config_dir_configs(config, fam) if config else {}
    if config:
        from ..families import family_of

        other = family_of(config)
        if other.name != layout.family:
            raise KoalaError(
                f"{path} is a {layout.family} single file but the config directory {config} is {other.label}",
                option="config",
            )
    if not config or len(configs) < 2:
        for k, v in fam.reference_pipeline_configs().items():
            configs.setdefault(k, v)
    if "unet" not in configs:
        raise KoalaError(f"{path}: no U-Net config; give a config directory", option="config")
    return configs


def convert_single_file(
    path: str,
    config: str | None = None,
    dtype=None,
    components: tuple[str, ...] | None = None,
    layout: Layout | None = None,
) -> Converted:
    """Load the components of an SDXL / SD-1.x single file as diffusers / transformers modules (strict: every
    tensor of every component must be in the file with the right shape)."""
    from safetensors import safe_open

    from ..families import get_family

    layout = layout or detect_layout(path)
    fam = get_family(layout.family)
    configs = _component_configs(path, config, layout, fam)
    hint = "" if config else f"; if this is not {fam.reference_name}'s architecture, give a config directory"
    dt = parse_dtype(dtype)
    prefixes = {**dict(_component_prefixes(fam)), "unet": layout.unet_prefix}
    modules, used = {}, set()
    with safe_open(path, "pt") as f:
        for name in components or tuple(layout.components):
            module = _meta_component(path, name, layout, configs)
            rules = _rules_for(name, module)
            state = _component_state(path, name, module, rules, prefixes[name], layout.shapes, f, hint)
            used.update(prefixes[name] + r.ldm for r in rules)
            modules[name] = _load_state(name, module, state, dt)
    ignored = sorted(k for k in layout.shapes if k not in used and not k.endswith("position_ids"))
    return Converted(layout, modules, ignored, config or f"koala's {fam.reference_name} configs")


def _meta_component(path: str, name: str, layout: Layout, configs: dict[str, dict]):
    """The file's component ``name`` built on meta from its config (the U-Net's structure read from the file)."""
    import diffusers
    import transformers

    if name not in layout.components:
        raise KoalaError(f"{path}: the file has no {name} (it holds {', '.join(layout.components)})")
    if name not in configs:
        raise KoalaError(
            f"{path}: no config for its {name}; give a config directory that has {name}/config.json",
            option="config",
        )
    cfg = configs[name]
    with torch.device("meta"):
        if name == "unet":
            cfg = infer_unet_config(layout.shapes, cfg, layout.unet_prefix, path)
            return diffusers.UNet2DConditionModel.from_config(cfg)
        if name == "vae":
            return diffusers.AutoencoderKL.from_config(cfg)
        arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        tcfg = transformers.CLIPTextConfig.from_dict({k: v for k, v in cfg.items() if k != "architectures"})
        return getattr(transformers, arch)(tcfg)


def _component_state(path: str, name: str, module, rules, prefix: str, shapes, f, hint: str) -> dict:
    """The component's state dict read from the open file ``f`` with ``rules``; a KoalaError (ending in ``hint``)
    when the file lacks a tensor the config needs, or one naming the mismatches when a tensor has another shape."""
    sd_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [prefix + r.ldm for r in rules if prefix + r.ldm not in shapes]
    if missing:
        raise KoalaError(
            f"{path}: its {name} lacks {len(missing)} tensor(s) the config needs, e.g. {', '.join(missing[:3])}"
            + hint,
            option="config",
        )
    state = from_ldm(lambda k: f.get_tensor(k), rules, sd_shapes, prefix)
    bad = [
        f"{k}: file {tuple(v.shape)} vs config {sd_shapes[k]}"
        for k, v in state.items()
        if tuple(v.shape) != sd_shapes[k]
    ]
    if bad:
        raise KoalaError(
            f"{path}: its {name} does not fit the config ({'; '.join(bad[:3])}); give the config "
            "directory of this architecture",
            option="config",
        )
    return state


def _load_state(name: str, module, state: dict, dt):
    """``module`` (on meta) holding ``state`` (in ``dt`` when given), in eval mode."""
    if dt is not None:
        state = {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
    res = module.load_state_dict(state, strict=False, assign=True)
    if res.missing_keys or res.unexpected_keys:  # the rules cover every tensor: a bug if this happens
        raise RuntimeError(f"{name}: missing {res.missing_keys[:3]}, unexpected {res.unexpected_keys[:3]}")
    return materialize_meta_buffers(module).eval()  # non-persistent position ids


def _tokenizers(config: str | None, fam: Family, path: str) -> list:
    """The tokenizers of a single file's pipeline: the config directory's, else (when the family names a hub
    repository) the ones in the local Hugging Face cache."""
    import transformers

    cls = getattr(transformers, fam.tokenizer_class_name)
    names = [tok for tok, _, _ in fam.text_encoders]
    if config and all(os.path.isdir(os.path.join(config, n)) for n in names):
        return [cls.from_pretrained(config, subfolder=n) for n in names]
    hub = fam.reference_hub_id  # only looked up in the local cache, never downloaded
    if hub:
        try:
            return [cls.from_pretrained(hub, subfolder=n, local_files_only=True) for n in names]
        except (OSError, ValueError):
            pass
    raise KoalaError(
        f"{path}: a single file carries no tokenizers; give a config directory (any {fam.label} pipeline "
        "directory: its tokenizers and configs are used, not its weights)"
        + (f", or have {hub} tokenizers in the local Hugging Face cache" if hub else ""),
        option="config",
    )


@dataclass
class ImportResult:
    out: str
    family: str
    kind: str  # pipeline / model
    components: list[str]
    ignored: list[str]
    config_source: str
    unet_config: dict


def single_file_to_diffusers(
    path: str,
    out_dir: str,
    config: str | None = None,
    dtype=None,
    overwrite: bool = False,
    unet_only: bool = False,
    stamp: dict | None = None,
) -> ImportResult:
    """Convert a single file to a diffusers pipeline directory (or, for a U-Net-only file or ``unet_only``, a U-Net
    directory) at ``out_dir``, atomically."""
    from ..families import Parts, get_family
    from ..utils.files import atomic_output_dir

    layout = detect_layout(path)
    fam = get_family(layout.family)
    full = not unet_only and {"vae", "text_encoder"} <= set(layout.components)
    if not unet_only and not full and len(layout.components) > 1:
        raise KoalaError(
            f"{path}: holds {', '.join(layout.components)} but not a whole pipeline; convert its U-Net "
            "alone (unet_only)"
        )
    refuse_existing(out_dir, overwrite)
    tokenizers = _tokenizers(config, fam, path) if full else []  # fail before converting gigabytes
    conv = convert_single_file(path, config, dtype, None if full else ("unet",), layout)
    m = conv.modules
    with atomic_output_dir(out_dir, overwrite) as tmp:
        if full:
            encoders = [m[enc] for _, enc, _ in fam.text_encoders]
            parts = Parts(fam, tokenizers, encoders, m["vae"], _scheduler_of(config, fam))
            fam.make_pipeline(parts, m["unet"]).save_pretrained(tmp, safe_serialization=True)
        else:
            m["unet"].save_pretrained(tmp, safe_serialization=True)
        if layout.metadata.get("koala.layer_map"):  # a koala student exported to one file: restore map and card
            _restore_student(layout.metadata["koala.layer_map"], tmp, m["unet"], path, full)
        _write_import_record(tmp, path, stamp, conv)
    return ImportResult(
        os.path.abspath(out_dir),
        layout.family,
        "pipeline" if full else "model",
        list(m),
        conv.ignored,
        conv.config_source,
        dict(m["unet"].config),
    )


def _scheduler_of(config: str | None, fam: Family):
    """The scheduler of the config directory, else of the family's shipped configs."""
    import diffusers

    f = os.path.join(config, "scheduler", "scheduler_config.json") if config else None
    sched_cfg = read_json(f) if f and os.path.isfile(f) else _shipped_configs(fam)["scheduler"]
    return getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)


def _write_import_record(folder: str, path: str, stamp: dict | None, conv: Converted) -> None:
    """``koala_import.json``: where the conversion came from (``ensure_diffusers`` reuses it by its stamp)."""
    record = {
        "source": os.path.abspath(path),
        **(stamp or {}),
        "family": conv.layout.family,
        "configs": conv.config_source,
        "ignored_keys": conv.ignored[:50],
        "ignored_count": len(conv.ignored),
    }
    with open(os.path.join(folder, "koala_import.json"), "w") as fh:
        json.dump(record, fh, indent=1)


def _restore_student(raw: str, folder: str, unet, path: str, full: bool) -> None:
    from ..arch.layer_map import LayerMap
    from ..card import write_model_card
    from ..utils.weights import count_params

    try:
        lmap = LayerMap.from_dict(json.loads(raw), f"{path} (metadata koala.layer_map)")
    except (json.JSONDecodeError, KoalaError):
        return  # a broken map is not worth failing the conversion for: the weights are whole
    if {k: unet.config.get(k) for k in ("layers_per_block", "transformer_layers_per_block", "mid_block_type")} != {
        k: lmap.student_config.get(k) for k in ("layers_per_block", "transformer_layers_per_block", "mid_block_type")
    }:
        return  # the map belongs to another structure (an edited file): leave it out rather than mislead
    lmap.save(os.path.join(folder, "unet") if full else folder)
    write_model_card(folder, lmap, count_params(unet), layout="pipeline" if full else "model")


def ensure_diffusers(path: str, target: str, config: str | None = None) -> str:
    """``target``: the diffusers pipeline converted from the single file ``path`` (converted now unless ``target``
    already holds this file's conversion: same path, size and modification time)."""
    st = os.stat(path)
    stamp = {"source": os.path.abspath(path), "size": st.st_size, "mtime": int(st.st_mtime)}
    marker = os.path.join(target, "koala_import.json")

    def fresh() -> bool:
        if not os.path.isfile(marker):
            return False
        d = read_json(marker)
        return all(d.get(k) == v for k, v in stamp.items())

    if fresh():
        return target
    try:
        single_file_to_diffusers(path, target, config=config, overwrite=os.path.exists(target), stamp=stamp)
    except OSError:
        if not fresh():  # another process of the same run converted it at the same time
            raise
    return target


def load_denoiser(path: str, dtype=None, config_from: str | None = None, family=None):
    """:func:`koala.families.load_diffusers_denoiser`, plus ``.safetensors`` files in the original single-file
    layout (a U-Net only or a whole checkpoint, e.g. an SGM-layout Lightning file), converted with ``config_from``'s
    config."""
    from ..families import family_of, load_diffusers_denoiser

    if config_from and is_single_file(path):
        fam = family_of(config_from, family)
        model = convert_single_file(path, config_from, components=("unet",)).modules["unet"]
        return model.to(parse_dtype(dtype) or torch.float32), fam
    return load_diffusers_denoiser(path, dtype, config_from=config_from, family=family)


def is_single_file(path: str) -> bool:
    """A ``.safetensors`` file whose keys are in the single-file (LDM / SGM) layout, not diffusers'."""
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    shapes, _ = read_header(path)
    return any(k.startswith(UNET_PREFIX) for k in shapes) or "input_blocks.0.0.weight" in shapes


__all__ = [
    "FORMATS",
    "ExportResult",
    "export_single_file",
    "export_diffusers",
    "Layout",
    "detect_layout",
    "infer_unet_config",
    "convert_single_file",
    "single_file_to_diffusers",
    "ensure_diffusers",
    "load_denoiser",
    "ImportResult",
    "is_single_file",
    "read_header",
]
