"""Generic surgery on diffusers ``UNet2DConditionModel`` configs and modules, whatever the family.

A student is described by a :class:`UNetSpec` (encoder resnets per stage, transformer depth per stage in the
encoder and decoder, mid block on/off, and optionally how many of the teacher's stages it keeps).
:func:`unet_student_config` turns a spec into a diffusers config derived from the teacher's, and
:func:`build_unet_layer_map` maps every student module to the teacher module at the same location. The
families (:mod:`koala.families`) add what is specific to SDXL or SD-1.x: topology checks, presets,
conditioning and pipelines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

from ..errors import KoalaError
from .config import public_config
from .layer_map import LayerMap, MapEntry, select_layers

DOWN_TYPES = {"DownBlock2D", "CrossAttnDownBlock2D"}
UP_TYPES = {"UpBlock2D", "CrossAttnUpBlock2D"}
MID_TYPES = {"UNetMidBlock2DCrossAttn", None}
# config fields that hold one value per stage (outermost first) and are cut when a spec drops inner stages
PER_STAGE_FIELDS = (
    "down_block_types",
    "block_out_channels",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
    "layers_per_block",
    "transformer_layers_per_block",
)


@dataclass
class UNetSpec:
    """How many blocks and transformer layers a U-Net keeps, stage by stage.

    ``encoder_layers[i]``: resnet(+transformer) pairs in encoder stage i (DW-(i+1)).
    ``down_depth[i]``: transformer layers per block in encoder stage i (ignored for stages without attention).
    ``up_depth[i]``: transformer layers per block in decoder stage i (lowest resolution first); an int, or a
    list with one depth per resnet of that stage.
    Decoder stages always have ``encoder_layers[mirror] + 1`` resnets (diffusers' U-Net topology).
    ``mid_block``: keep the mid block (its depth is ``down_depth[-1]``, as in diffusers).
    ``stages``: keep only the outermost ``stages`` encoder/decoder stages (BK-SDM-Tiny drops the innermost);
    ``None`` keeps all. The lists above then have ``stages`` entries.
    """

    encoder_layers: list[int]
    down_depth: list[Any]
    up_depth: list[Any]
    mid_block: bool = True
    stages: int | None = None
    description: str = field(default="", compare=False)
    paper_params: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetSpec":
        known = ("encoder_layers", "down_depth", "up_depth", "mid_block", "stages")
        unknown = sorted(set(d) - set(known) - {"description", "paper_params"})
        if unknown:
            raise KoalaError(f"spec: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
        missing = [k for k in known[:3] if k not in d]
        if missing:
            raise KoalaError(f"spec: missing field(s) {', '.join(missing)}")
        return cls(**{k: d[k] for k in known if k in d})


def _per_stage(value, n):
    if isinstance(value, (int, float, str)) or value is None:
        return [value] * n
    return [v if not isinstance(v, (list, tuple)) else list(v) for v in value]


def unet_topology_problems(config: dict[str, Any]) -> list[str]:
    """What keeps ``config`` from being a plain (Cross)Attn Down/Up block U-Net koala can cut; [] when fine."""
    problems = []
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        problems.append(f"_class_name is {config.get('_class_name')!r}, expected 'UNet2DConditionModel'")
    downs, ups = list(config.get("down_block_types", [])), list(config.get("up_block_types", []))
    if not downs or any(t not in DOWN_TYPES for t in downs):
        problems.append(f"down_block_types {downs} must use only {sorted(DOWN_TYPES)}")
    if not ups or any(t not in UP_TYPES for t in ups):
        problems.append(f"up_block_types {ups} must use only {sorted(UP_TYPES)}")
    if len(downs) != len(ups) or [t.replace("Down", "") for t in downs] != [
        t.replace("Up", "") for t in reversed(ups)
    ]:
        problems.append(f"up_block_types {ups} do not mirror down_block_types {downs}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in MID_TYPES:
        problems.append(f"mid_block_type {config.get('mid_block_type')!r} is not supported")
    if config.get("dual_cross_attention"):
        problems.append("dual_cross_attention is not supported")
    return problems


def unet_teacher_spec(config: dict[str, Any]) -> UNetSpec:
    """The spec that reproduces a (valid) U-Net config exactly."""
    n = len(config["down_block_types"])
    lpb = _per_stage(config["layers_per_block"], n)
    depth = _per_stage(config.get("transformer_layers_per_block", 1), n)
    down = [depth[i] if config["down_block_types"][i].startswith("CrossAttn") else 0 for i in range(n)]
    rev = config.get("reverse_transformer_layers_per_block")
    up_src = list(reversed(depth)) if rev is None else [list(r) if isinstance(r, (list, tuple)) else r for r in rev]
    up = [up_src[i] if config["up_block_types"][i].startswith("CrossAttn") else 0 for i in range(n)]
    return UNetSpec(
        lpb, down, up, config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None, None, "teacher"
    )


def _depth_le(student, teacher) -> bool:
    s = student if isinstance(student, list) else None
    t = teacher if isinstance(teacher, list) else None
    if s is None and t is None:
        return student <= teacher
    if s is None:
        return all(student <= x for x in t)  # type: ignore[union-attr]
    if t is None:
        return all(x <= teacher for x in s)
    return all(a <= b for a, b in zip(s, t))


def unet_student_config(teacher_config: dict[str, Any], spec: UNetSpec) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config for ``spec``, derived from the teacher's config.

    Raises :class:`KoalaError` when the spec asks for more stages, blocks or layers than the teacher has.
    """
    t = unet_teacher_spec(teacher_config)
    n_t = len(teacher_config["down_block_types"])
    n = n_t if spec.stages is None else int(spec.stages)
    if not 1 <= n <= n_t:
        raise KoalaError(f"spec stages={spec.stages} must be between 1 and the teacher's {n_t}")
    off = n_t - n  # the student's decoder stage i is the teacher's stage i + off
    for name in ("encoder_layers", "down_depth", "up_depth"):
        if len(getattr(spec, name)) != n:
            raise KoalaError(
                f"spec field {name} has {len(getattr(spec, name))} stages but the student keeps {n} (teacher: {n_t})"
            )
    for i in range(n):
        if spec.encoder_layers[i] < 1 or spec.encoder_layers[i] > t.encoder_layers[i]:
            raise KoalaError(
                f"spec encoder_layers[{i}]={spec.encoder_layers[i]} must be between 1 and the "
                f"teacher's {t.encoder_layers[i]}"
            )
        if not _depth_le(spec.down_depth[i], t.down_depth[i]):
            raise KoalaError(
                f"spec down_depth[{i}]={spec.down_depth[i]} is deeper than the teacher's {t.down_depth[i]}"
            )
        if not _depth_le(spec.up_depth[i], t.up_depth[i + off]):
            raise KoalaError(
                f"spec up_depth[{i}]={spec.up_depth[i]} is deeper than the teacher's {t.up_depth[i + off]}"
            )
        if isinstance(spec.up_depth[i], list) and len(spec.up_depth[i]) != spec.encoder_layers[n - 1 - i] + 1:
            raise KoalaError(
                f"spec up_depth[{i}] lists {len(spec.up_depth[i])} layers but decoder stage {i + 1} has "
                f"{spec.encoder_layers[n - 1 - i] + 1} resnets"
            )
    if spec.mid_block and not t.mid_block:
        raise KoalaError("spec keeps the mid block but the teacher has none")

    cfg = public_config(teacher_config)
    for k in PER_STAGE_FIELDS:
        if isinstance(cfg.get(k), (list, tuple)):
            cfg[k] = list(cfg[k])[:n]
    cfg["up_block_types"] = list(teacher_config["up_block_types"])[off:]
    # one int when every stage has the same count (diffusers' single-file loader reads layers_per_block as an int)
    lpb = list(spec.encoder_layers)
    cfg["layers_per_block"] = lpb[0] if len(set(lpb)) == 1 else lpb
    attn = [ty.startswith("CrossAttn") for ty in cfg["down_block_types"]]
    # Stages without attention get depth 1 (ignored by DownBlock2D/UpBlock2D) so diffusers accepts the list.
    cfg["transformer_layers_per_block"] = [spec.down_depth[i] if attn[i] else 1 for i in range(n)]
    up_attn = [ty.startswith("CrossAttn") for ty in cfg["up_block_types"]]
    rev = []
    for i in range(n):
        d = spec.up_depth[i] if up_attn[i] else 1
        rev.append(list(d) if isinstance(d, list) else [d] * (spec.encoder_layers[n - 1 - i] + 1))
    cfg["reverse_transformer_layers_per_block"] = rev
    cfg["mid_block_type"] = "UNetMidBlock2DCrossAttn" if spec.mid_block else None
    return cfg


def _attn_entries(prefix_s, prefix_t, stage, idx_s, idx_t, a_s, a_t, selection) -> Iterable[MapEntry]:
    yield MapEntry(prefix_s, prefix_t, stage, "attention", idx_s, idx_t)
    sel = select_layers(len(a_t.transformer_blocks), len(a_s.transformer_blocks), selection)
    for k, tk in enumerate(sel):
        yield MapEntry(
            f"{prefix_s}.transformer_blocks.{k}",
            f"{prefix_t}.transformer_blocks.{tk}",
            stage,
            "transformer_layer",
            idx_s,
            idx_t,
            k,
            tk,
        )


def build_unet_layer_map(teacher: torch.nn.Module, student: torch.nn.Module, selection: str = "bottom") -> LayerMap:
    """Map every student module of a U-Net to its teacher module at the same location.

    Encoder stages keep their first resnet/attention pairs. Decoder stages keep their first ones plus the
    last one, whose input takes the skip connection with the stage's input channel count (so every copied
    tensor has exactly the teacher tensor's shape). A student with fewer stages keeps the outermost ones
    (its decoder stage i is the teacher's i + dropped). Transformer layers follow ``selection`` (SA-bottom).
    Stage names are the teacher's: DW-1.., MID, UP-1.. . Works on meta-device modules: only structure is read.
    """
    entries = [
        MapEntry(name, name, "IO", "io")
        for name in ("conv_in", "time_embedding", "add_embedding", "conv_norm_out", "conv_out")
        if getattr(student, name, None) is not None
    ]
    n, n_t = len(student.down_blocks), len(teacher.down_blocks)
    if n > n_t:
        raise KoalaError(f"student has {n} encoder stages but the teacher only {n_t}")
    dropped = n_t - n
    entries += _encoder_entries(student, teacher, selection)
    entries += _mid_entries(student, teacher, dropped, selection)
    entries += _decoder_entries(student, teacher, dropped, selection)
    return LayerMap(entries, selection, dict(teacher.config), dict(student.config))


def _block_entries(bs, bt, path_s: str, path_t: str, stage: str, pairs, selection: str) -> list[MapEntry]:
    """For each ``(j, tj)`` of ``pairs``: student resnet ``j`` -> teacher resnet ``tj``, and (a block with
    attentions) attention ``j`` -> ``tj`` with its transformer layers."""
    entries = []
    for j, tj in pairs:
        entries.append(MapEntry(f"{path_s}.resnets.{j}", f"{path_t}.resnets.{tj}", stage, "resnet", j, tj))
        if getattr(bs, "attentions", None) is not None:
            entries += _attn_entries(
                f"{path_s}.attentions.{j}",
                f"{path_t}.attentions.{tj}",
                stage,
                j,
                tj,
                bs.attentions[j],
                bt.attentions[tj],
                selection,
            )
    return entries


def _encoder_entries(student, teacher, selection: str) -> list[MapEntry]:
    """Encoder stage i -> the teacher's stage i: its first resnet/attention pairs and its downsampler."""
    entries = []
    for i, (bs, bt) in enumerate(zip(student.down_blocks, teacher.down_blocks)):
        stage, path = f"DW-{i + 1}", f"down_blocks.{i}"
        if len(bs.resnets) > len(bt.resnets):
            raise KoalaError(
                f"{stage}: student has more resnets ({len(bs.resnets)}) than the teacher ({len(bt.resnets)})"
            )
        entries += _block_entries(bs, bt, path, path, stage, [(j, j) for j in range(len(bs.resnets))], selection)
        if bs.downsamplers is not None:
            entries.append(MapEntry(f"{path}.downsamplers", f"{path}.downsamplers", stage, "downsampler"))
    return entries


def _mid_entries(student, teacher, dropped: int, selection: str) -> list[MapEntry]:
    """The mid block's resnets, then its attentions (none without a student mid block)."""
    ms, mt = student.mid_block, teacher.mid_block
    if ms is None:
        return []
    if mt is None or dropped:
        raise KoalaError("student has a mid block but the teacher has none at that resolution")
    entries = [
        MapEntry(f"mid_block.resnets.{j}", f"mid_block.resnets.{j}", "MID", "resnet", j, j)
        for j in range(len(ms.resnets))
    ]
    for j in range(len(ms.attentions)):
        path = f"mid_block.attentions.{j}"
        entries += _attn_entries(path, path, "MID", j, j, ms.attentions[j], mt.attentions[j], selection)
    return entries


def _decoder_entries(student, teacher, dropped: int, selection: str) -> list[MapEntry]:
    """Decoder stage i -> the teacher's stage i + dropped: its first resnet/attention pairs, the last one to the
    teacher's last (the skip connection's channels), and its upsampler."""
    entries = []
    for i, bs in enumerate(student.up_blocks):
        ti = i + dropped
        bt, stage = teacher.up_blocks[ti], f"UP-{ti + 1}"
        ns, nt = len(bs.resnets), len(bt.resnets)
        if ns > nt:
            raise KoalaError(f"{stage}: student has more resnets ({ns}) than the teacher ({nt})")
        pairs = [(j, j if j < ns - 1 else nt - 1) for j in range(ns)]
        entries += _block_entries(bs, bt, f"up_blocks.{i}", f"up_blocks.{ti}", stage, pairs, selection)
        if bs.upsamplers is not None:
            entries.append(MapEntry(f"up_blocks.{i}.upsamplers", f"up_blocks.{ti}.upsamplers", stage, "upsampler"))
    return entries


def unet_stage_modules(
    lmap: LayerMap, student: torch.nn.Module, teacher: torch.nn.Module
) -> dict[str, tuple[str, str]]:
    """Stage name -> (student block, teacher block) whose outputs are the stage's last feature (LF).

    A student encoder stage that lost its downsampler (its inner stages were dropped) has no output of the
    teacher stage's shape and is left out."""
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    out: dict[str, tuple[str, str]] = {}
    for e in lmap.entries:
        if e.stage == "IO" or e.stage in out:
            continue
        pair = (
            ("mid_block", "mid_block")
            if e.stage == "MID"
            else tuple(".".join(n.split(".")[:2]) for n in (e.student, e.teacher))
        )
        s_block, t_block = s_mods[pair[0]], t_mods[pair[1]]
        if (getattr(s_block, "downsamplers", None) is None) != (getattr(t_block, "downsamplers", None) is None):
            continue
        out[e.stage] = pair
    return out


def unet_transformer_pairs(lmap: LayerMap, student, teacher, selection: str | None) -> list[tuple[str, str, str]]:
    """(stage, student layer prefix, teacher layer prefix) for every student transformer layer: the layer map's
    pairs (``selection`` None), or per attention block the teacher layers ``selection`` picks."""
    if selection is None:
        return [(e.stage, e.student, e.teacher) for e in lmap.of_kind("transformer_layer")]
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    out = []
    for e in lmap.of_kind("attention"):
        n_s = len(s_mods[e.student].transformer_blocks)
        n_t = len(t_mods[e.teacher].transformer_blocks)
        for k, tk in enumerate(select_layers(n_t, n_s, selection)):
            out.append((e.stage, f"{e.student}.transformer_blocks.{k}", f"{e.teacher}.transformer_blocks.{tk}"))
    return out
