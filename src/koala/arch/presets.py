"""U-Net presets: SDXL-Base and its compressed students, as overrides of a teacher's diffusers config.

A student is described by a :class:`UNetSpec` (encoder resnets per stage, transformer depth per stage in
the encoder and decoder, mid block on/off). :func:`student_config` turns a spec into a diffusers
``UNet2DConditionModel`` config derived from the teacher's, so the same preset works for any
SDXL-architecture checkpoint (Base, Turbo, Lightning, fine-tunes) and for tiny test teachers.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import KoalaError

# The exact SDXL-Base-1.0 U-Net config (public fact: stabilityai/stable-diffusion-xl-base-1.0/unet/config.json).
SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

DOWN_TYPES = {"DownBlock2D", "CrossAttnDownBlock2D"}
UP_TYPES = {"UpBlock2D", "CrossAttnUpBlock2D"}
MID_TYPES = {"UNetMidBlock2DCrossAttn", None}


@dataclass
class UNetSpec:
    """How many blocks and transformer layers a U-Net keeps, stage by stage.

    ``encoder_layers[i]``: resnet(+transformer) pairs in encoder stage i (DW-(i+1)).
    ``down_depth[i]``: transformer layers per block in encoder stage i (ignored for stages without attention).
    ``up_depth[i]``: transformer layers per block in decoder stage i (UP-(i+1), lowest resolution first).
    Decoder stages always have ``encoder_layers[mirror] + 1`` resnets (diffusers' U-Net topology).
    ``mid_block``: keep the mid block (its depth is ``down_depth[-1]``, as in diffusers).
    """

    encoder_layers: list[int]
    down_depth: list[int]
    up_depth: list[int]
    mid_block: bool = True
    description: str = ""
    paper_params: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetSpec":
        return cls(**{k: d[k] for k in ("encoder_layers", "down_depth", "up_depth", "mid_block") if k in d})


def _sdxl_like(encoder_layers, down_depth, up_depth, mid, desc, paper=None) -> UNetSpec:
    return UNetSpec(list(encoder_layers), list(down_depth), list(up_depth), mid, desc, paper)


# Depth lists are written lowest stage first for the encoder (DW-1, DW-2, DW-3) and lowest resolution first
# for the decoder (UP-1, UP-2, UP-3), as in the paper's Fig. 2. Entries for stages without attention are 0.
PRESETS: dict[str, UNetSpec] = {
    "sdxl-base": _sdxl_like([2, 2, 2], [0, 2, 10], [10, 2, 0], True, "SDXL-Base-1.0 U-Net (teacher)", 2_567_000_000),
    "bk-sdxl": _sdxl_like([1, 1, 1], [0, 2, 10], [10, 2, 0], True, "BK-SDM block removal on SDXL (Table 2)", 1_717_000_000),
    "koala-1b": _sdxl_like([1, 1, 1], [0, 2, 6], [6, 2, 0], True, "KOALA-1B: block removal + depth 10->6", 1_161_000_000),
    "koala-700m": _sdxl_like([1, 1, 1], [0, 2, 5], [5, 2, 0], False, "KOALA-700M: depth 10->5, no mid block", 782_000_000),
    # Segmind's distilled SDXL variants, for comparison only. Reconstructed layer counts (asymmetric decoder
    # depths, no mid block); SSD-1B lands on its reported 1.3B, Vega on 734M against a reported 745M.
    "ssd-1b": _sdxl_like([2, 2, 2], [0, 2, 4], [[4, 4, 10], [2, 1, 1], [0, 0, 0]], False, "Segmind SSD-1B (comparison)"),
    "segmind-vega": _sdxl_like([2, 2, 2], [0, 2, 2], [[2, 2, 2], [1, 1, 1], [0, 0, 0]], False,
                               "Segmind Vega (comparison, approximate)"),
}
PAPER_MODELS = ("sdxl-base", "bk-sdxl", "koala-1b", "koala-700m")


def teacher_spec(config: dict[str, Any]) -> UNetSpec:
    """The spec that reproduces a (validated) SDXL-topology teacher config exactly."""
    check_sdxl_topology(config)
    n = len(config["down_block_types"])
    lpb = _per_stage(config["layers_per_block"], n)
    depth = _per_stage(config["transformer_layers_per_block"], n)
    down = [depth[i] if config["down_block_types"][i].startswith("CrossAttn") else 0 for i in range(n)]
    rev = config.get("reverse_transformer_layers_per_block")
    if rev is None:
        up_src = list(reversed(depth))
    else:
        up_src = [list(r) if isinstance(r, (list, tuple)) else r for r in rev]
    up = [up_src[i] if config["up_block_types"][i].startswith("CrossAttn") else 0 for i in range(n)]
    return UNetSpec(lpb, down, up, config.get("mid_block_type") is not None, "teacher")


def _per_stage(value, n):
    if isinstance(value, int):
        return [value] * n
    return [v if isinstance(v, int) else list(v) for v in value]


def check_sdxl_topology(config: dict[str, Any], where: str = "U-Net config") -> None:
    """Refuse configs that are not SDXL-architecture (e.g. an SD-1.5 U-Net) with a message naming the field."""
    problems = []
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        problems.append(f"_class_name is {config.get('_class_name')!r}, expected 'UNet2DConditionModel'")
    if config.get("addition_embed_type") != "text_time":
        problems.append(
            f"addition_embed_type is {config.get('addition_embed_type')!r}, expected 'text_time' "
            "(SDXL's pooled-text + size/crop conditioning; SD-1.x/2.x U-Nets do not have it)"
        )
    downs = list(config.get("down_block_types", []))
    ups = list(config.get("up_block_types", []))
    if not downs or any(t not in DOWN_TYPES for t in downs):
        problems.append(f"down_block_types {downs} must use only {sorted(DOWN_TYPES)}")
    if not ups or any(t not in UP_TYPES for t in ups):
        problems.append(f"up_block_types {ups} must use only {sorted(UP_TYPES)}")
    if downs and downs[0] != "DownBlock2D":
        problems.append(f"down_block_types[0] is {downs[0]!r}; SDXL has no attention at the highest resolution (DownBlock2D)")
    if len(downs) != len(ups) or [t.replace("Down", "") for t in downs] != [t.replace("Up", "") for t in reversed(ups)]:
        problems.append(f"up_block_types {ups} do not mirror down_block_types {downs}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in MID_TYPES:
        problems.append(f"mid_block_type {config.get('mid_block_type')!r} is not supported")
    if config.get("dual_cross_attention"):
        problems.append("dual_cross_attention is not supported")
    if problems:
        raise KoalaError(f"{where} is not an SDXL-architecture U-Net: " + "; ".join(problems))


def resolve_spec(preset: str | UNetSpec | dict) -> UNetSpec:
    if isinstance(preset, UNetSpec):
        return preset
    if isinstance(preset, dict):
        return UNetSpec.from_dict(preset)
    if preset not in PRESETS:
        raise KoalaError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)} (or give a custom spec)")
    return copy.deepcopy(PRESETS[preset])


def _depth_le(student, teacher) -> bool:
    if isinstance(student, int) and isinstance(teacher, int):
        return student <= teacher
    s = student if isinstance(student, list) else None
    t = teacher if isinstance(teacher, list) else None
    if s is None:
        return all(student <= x for x in t)  # type: ignore[union-attr]
    if t is None:
        return all(x <= teacher for x in s)
    return all(a <= b for a, b in zip(s, t))


def student_config(teacher_config: dict[str, Any], spec: UNetSpec | str | dict) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config for ``spec``, derived from the teacher's config.

    Raises :class:`KoalaError` when the spec asks for more blocks or layers than the teacher has.
    """
    spec = resolve_spec(spec)
    check_sdxl_topology(teacher_config, "teacher U-Net config")
    t = teacher_spec(teacher_config)
    n = len(teacher_config["down_block_types"])
    for name in ("encoder_layers", "down_depth", "up_depth"):
        if len(getattr(spec, name)) != n:
            raise KoalaError(f"spec field {name} has {len(getattr(spec, name))} stages but the teacher has {n}")
    for i in range(n):
        if spec.encoder_layers[i] < 1 or spec.encoder_layers[i] > t.encoder_layers[i]:
            raise KoalaError(
                f"spec encoder_layers[{i}]={spec.encoder_layers[i]} must be between 1 and the teacher's {t.encoder_layers[i]}"
            )
        if not _depth_le(spec.down_depth[i], t.down_depth[i]):
            raise KoalaError(f"spec down_depth[{i}]={spec.down_depth[i]} is deeper than the teacher's {t.down_depth[i]}")
        if not _depth_le(spec.up_depth[i], t.up_depth[i]):
            raise KoalaError(f"spec up_depth[{i}]={spec.up_depth[i]} is deeper than the teacher's {t.up_depth[i]}")
        if isinstance(spec.up_depth[i], list) and len(spec.up_depth[i]) != spec.encoder_layers[n - 1 - i] + 1:
            raise KoalaError(
                f"spec up_depth[{i}] lists {len(spec.up_depth[i])} layers but decoder stage UP-{i + 1} has "
                f"{spec.encoder_layers[n - 1 - i] + 1} resnets"
            )
    if spec.mid_block and not t.mid_block:
        raise KoalaError("spec keeps the mid block but the teacher has none")

    cfg = copy.deepcopy(dict(teacher_config))
    for k in list(cfg):
        if k.startswith("_") and k != "_class_name":
            cfg.pop(k)
    cfg["layers_per_block"] = list(spec.encoder_layers)
    attn = [ty.startswith("CrossAttn") for ty in teacher_config["down_block_types"]]
    # Stages without attention get depth 1 (ignored by DownBlock2D/UpBlock2D) so diffusers accepts the list.
    cfg["transformer_layers_per_block"] = [spec.down_depth[i] if attn[i] else 1 for i in range(n)]
    up_attn = [ty.startswith("CrossAttn") for ty in teacher_config["up_block_types"]]
    rev = []
    for i in range(n):
        n_res = spec.encoder_layers[n - 1 - i] + 1
        d = spec.up_depth[i] if up_attn[i] else 1
        rev.append(list(d) if isinstance(d, list) else [d] * n_res)
    cfg["reverse_transformer_layers_per_block"] = rev
    cfg["mid_block_type"] = "UNetMidBlock2DCrossAttn" if spec.mid_block else None
    return cfg
