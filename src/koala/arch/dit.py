"""Generic surgery on diffusion transformers (diffusers ``PixArtTransformer2DModel``): depth cuts and their layer map.

A DiT is a stack of identical transformer blocks between an input stem (patch embedding, timestep and caption
embedders) and an output head. A student (:class:`DiTSpec`) keeps ``num_layers`` of the teacher's blocks, at
the same hidden size, chosen by a layer selection (the paper's DiT-M keeps the *bottom* 14 of DiT-XL's 28,
App. A.4); the stem and head are copied whole. Each kept block is its own stage, ``B-1`` .. ``B-n`` (student
numbering, 1-based), so feature KD can be asked for per block or per range (``B-1..B-7``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import KoalaError
from .config import public_config
from .layer_map import LayerMap, MapEntry, select_layers

DIT_CLASS = "PixArtTransformer2DModel"


@dataclass
class DiTSpec:
    """How many transformer blocks a DiT student keeps (hidden size, heads, stem and head stay the teacher's)."""

    num_layers: int
    description: str = field(default="", compare=False)
    paper_params: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTSpec":
        unknown = sorted(set(d) - {"num_layers", "description", "paper_params"})
        if unknown:
            raise KoalaError(
                f"spec: unknown field(s) {', '.join(unknown)}; a DiT spec has only num_layers "
                "(e.g. '{\"num_layers\": 14}')"
            )
        if "num_layers" not in d:
            raise KoalaError("spec: missing field num_layers (a DiT student is described by its depth)")
        n = d["num_layers"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise KoalaError(f"spec: num_layers must be a positive integer, got {n!r}")
        return cls(n)


def stage_name(k: int) -> str:
    """Stage of student block ``k`` (0-based): ``B-(k+1)``."""
    return f"B-{k + 1}"


def dit_topology_problems(config: dict[str, Any]) -> list[str]:
    """What keeps ``config`` from being a PixArt DiT koala can cut; [] when fine."""
    cls = config.get("_class_name")
    if cls is not None and cls != DIT_CLASS:
        return [f"_class_name is {cls!r}, expected {DIT_CLASS!r}"]
    problems = []
    if "num_layers" not in config or "attention_head_dim" not in config:
        problems.append("no num_layers / attention_head_dim: not a transformer config")
        return problems
    if config.get("norm_type") != "ada_norm_single":
        problems.append(
            f"norm_type is {config.get('norm_type')!r}, expected 'ada_norm_single' (PixArt's adaLN-single)"
        )
    if not config.get("caption_channels"):
        problems.append("caption_channels is not set (PixArt projects T5 embeddings with a caption projection)")
    if config.get("num_vector_embeds") is not None:
        problems.append("num_vector_embeds is set (a discrete-token transformer, not a latent DiT)")
    return problems


def dit_student_config(teacher_config: dict[str, Any], spec: DiTSpec) -> dict[str, Any]:
    """The teacher's config with ``num_layers`` = the spec's; refuses a student deeper than its teacher."""
    n_t = int(teacher_config["num_layers"])
    if not 1 <= spec.num_layers <= n_t:
        raise KoalaError(
            f"spec num_layers={spec.num_layers} must be between 1 and the teacher's {n_t} transformer blocks"
        )
    cfg = public_config(teacher_config)
    cfg["num_layers"] = spec.num_layers
    return cfg


def build_dit_layer_map(teacher: torch.nn.Module, student: torch.nn.Module, selection: str = "bottom") -> LayerMap:
    """Map every student module of a DiT to the teacher module it is copied from: stem, head and the top-level
    ``scale_shift_table`` to themselves, student block k to the teacher block ``selection`` picks (stage B-(k+1))."""
    entries = [
        MapEntry(name, name, "IO", "io") for name, _ in student.named_children() if name != "transformer_blocks"
    ]
    entries += [MapEntry(name, name, "IO", "io") for name, _ in student.named_parameters(recurse=False)]
    n_s, n_t = len(student.transformer_blocks), len(teacher.transformer_blocks)
    if n_s > n_t:
        raise KoalaError(f"student has {n_s} transformer blocks but the teacher only {n_t}")
    for k, tk in enumerate(select_layers(n_t, n_s, selection)):
        entries.append(
            MapEntry(
                f"transformer_blocks.{k}", f"transformer_blocks.{tk}", stage_name(k), "transformer_layer", k, tk, k, tk
            )
        )
    return LayerMap(entries, selection, dict(teacher.config), dict(student.config))


def dit_transformer_pairs(lmap: LayerMap, student, teacher, selection: str | None) -> list[tuple[str, str, str]]:
    """(stage, student block, teacher block) per student block: the layer map's pairs, or ``selection``'s."""
    if selection is None:
        return [(e.stage, e.student, e.teacher) for e in lmap.of_kind("transformer_layer")]
    n_s, n_t = len(student.transformer_blocks), len(teacher.transformer_blocks)
    return [
        (stage_name(k), f"transformer_blocks.{k}", f"transformer_blocks.{tk}")
        for k, tk in enumerate(select_layers(n_t, n_s, selection))
    ]


def dit_stage_modules(lmap: LayerMap) -> dict[str, tuple[str, str]]:
    """Stage -> (student block, teacher block): a block's output is its stage's last feature (LF)."""
    return {e.stage: (e.student, e.teacher) for e in lmap.of_kind("transformer_layer")}
