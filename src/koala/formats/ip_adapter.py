"""IP-Adapters on KOALA students: read a teacher's IP-Adapter file, keep the cross-attention layers the student keeps
(its ``koala_layer_map.json`` says which), renumber them for the student's attention processors, write the file in
the layout diffusers' ``load_ip_adapter`` reads.

An IP-Adapter file holds ``image_proj.*`` (the image projection: CLIP image embedding -> extra context tokens) and,
per cross-attention layer of the U-Net, ``ip_adapter.N.to_k_ip.weight`` / ``ip_adapter.N.to_v_ip.weight``.
diffusers numbers the layers by the U-Net's attention processors (``unet.attn_processors``, self- and
cross-attention alike, in module order): the k-th cross-attention processor reads ``N = 2k + 1``
(``UNet2DConditionLoadersMixin._convert_ip_adapter_attn_to_diffusers``). A student keeps fewer transformer layers, so
the same N means another layer: this module renumbers. The image projection depends only on the image encoder and
the cross-attention width, which a student shares with its teacher: it is copied unchanged.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import KoalaError
from ..utils.files import refuse_existing

_LAYER_KEY = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
# what the image projection is, by the key diffusers tells it by (_convert_ip_adapter_image_proj_to_diffusers)
_PROJ_KINDS = (
    ("proj.weight", "IP-Adapter"),
    ("proj.3.weight", "IP-Adapter Full Face"),
    ("perceiver_resampler.proj_in.weight", "IP-Adapter FaceID Plus"),
    ("norm.weight", "IP-Adapter FaceID"),
    ("latents", "IP-Adapter Plus"),
)
LAYOUT = (
    "image_proj.* (the image projection) and ip_adapter.N.to_k_ip.weight / ip_adapter.N.to_v_ip.weight with "
    "N = 1, 3, 5, ... (diffusers' load_ip_adapter layout)"
)


@dataclass
class IPAdapterFile:
    path: str
    kind: str  # IP-Adapter / IP-Adapter Plus / ...
    image_proj: dict[str, torch.Tensor]  # keys without the "image_proj." prefix
    layers: dict[int, dict[str, torch.Tensor]]  # N -> {"to_k_ip": weight, "to_v_ip": weight}


def cross_attention_layers(unet) -> list[str]:
    """Module names of ``unet``'s cross-attention layers in the order diffusers numbers IP-Adapter layers (the k-th
    reads ``ip_adapter.{2k+1}.*``): its attention processors, less self-attention (``attn1``) and motion modules."""
    return [
        name[: -len(".processor")]
        for name in unet.attn_processors
        if not name.endswith("attn1.processor") and "motion_modules" not in name
    ]


def read_ip_adapter(path: str) -> IPAdapterFile:
    """Parse an IP-Adapter ``.safetensors`` file; a KoalaError naming the file for anything not in :data:`LAYOUT`."""
    from safetensors import safe_open

    from ..utils.weights import check_user_safetensors

    check_user_safetensors(path, "IP-Adapter files")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    proj = {k[len("image_proj.") :]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    other = []
    for k, v in tensors.items():
        m = _LAYER_KEY.match(k)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = v
        elif not k.startswith("image_proj."):
            other.append(k)
    if any("_lora" in k for k in other):
        raise KoalaError(
            f"{path}: an IP-Adapter with LoRA layers (FaceID); koala transfers the image projection and "
            "to_k_ip / to_v_ip only"
        )
    _check_layout(path, proj, layers, other)
    kind = next(what for key, what in _PROJ_KINDS if key in proj)
    return IPAdapterFile(path, kind, proj, dict(sorted(layers.items())))


def _check_layout(path: str, proj: dict, layers: dict, other: list[str]) -> None:
    """Refuse a file whose keys are not an IP-Adapter's, naming what is wrong."""

    def refuse(problem: str):
        raise KoalaError(f"{path}: not an IP-Adapter file of a layout koala knows ({problem}); expected {LAYOUT}")

    if other:
        refuse(f"{len(other)} key(s) of neither part, e.g. {', '.join(sorted(other)[:3])}")
    if not proj:
        refuse("no image_proj.* keys")
    if not layers:
        refuse("no ip_adapter.N.to_k_ip / to_v_ip keys")
    if not any(key in proj for key, _ in _PROJ_KINDS):
        refuse(f"an image projection of no known kind (keys {', '.join(sorted(proj)[:4])})")
    even = [n for n in layers if n % 2 == 0]
    if even:
        refuse(f"layer number {even[0]} is even; diffusers reads cross-attention layers as 1, 3, 5, ...")
    half = [n for n, parts in layers.items() if len(parts) != 2]
    if half:
        refuse(f"layer {half[0]} has {', '.join(layers[half[0]])} only; each layer needs to_k_ip and to_v_ip")


# ------------------------------------------------------------------------------------------- transfer
@dataclass
class IPAdapterTransferReport:
    out: str
    kind: str
    kept: int  # student cross-attention layers written
    dropped: int  # teacher layers the student does not have
    dropped_by_stage: dict[str, int]
    teacher_layers: int

    def summary(self) -> str:
        stages = ", ".join(f"{s}: {n}" for s, n in sorted(self.dropped_by_stage.items())) or "none"
        return (
            f"{self.kind} -> {self.out}: {self.kept} of the teacher's {self.teacher_layers} cross-attention "
            f"layers kept and renumbered for the student, {self.dropped} dropped (removed from the student; by "
            f"stage: {stages}); image projection copied"
        )


def transfer_ip_adapter(path: str, student: str, out: str, overwrite: bool = False) -> IPAdapterTransferReport:
    """Map the teacher's IP-Adapter ``path`` onto ``student`` (a student pipeline or U-Net directory with its layer
    map) and write it to ``out`` (``.safetensors``, atomically): each student cross-attention layer gets the
    ``to_k_ip`` / ``to_v_ip`` of the teacher layer it was initialised from, under the student's own number."""
    from ..arch.layer_map import LayerMap
    from ..families import FAMILIES, get_family, model_dir
    from ..utils.files import read_json

    if not out.endswith(".safetensors"):
        raise KoalaError(f"{out}: name the output IP-Adapter *.safetensors", option="out")
    refuse_existing(out, overwrite, "file")
    lmap = LayerMap.load(student)
    fam = get_family(lmap.family)
    if not fam.ip_adapter_transfer:
        covered = ", ".join(f.label for f in FAMILIES.values() if f.ip_adapter_transfer)
        raise KoalaError(
            f"{student}: IP-Adapter transfer covers U-Net students ({covered}), not {fam.label}: "
            f"{fam.ip_adapter_missing}"
        )
    teacher = fam.build_model(lmap.teacher_config, "meta")
    s_model = fam.build_model(read_json(os.path.join(model_dir(student), "config.json")), "meta")
    ipa = read_ip_adapter(path)
    t_layers = cross_attention_layers(teacher)
    check_fits(ipa, teacher, t_layers, f"the student's teacher ({lmap.meta.get('teacher_path', 'its layer map')})")
    tensors, kept, by_stage = student_layers(ipa, lmap, t_layers, cross_attention_layers(s_model))
    report = IPAdapterTransferReport(
        os.path.abspath(out), ipa.kind, kept, sum(by_stage.values()), by_stage, len(t_layers)
    )
    meta = {
        "format": "pt",
        "koala.ip_adapter_source": os.path.abspath(path),
        "koala.student": os.path.abspath(student),
        "koala.report": report.summary(),
    }
    _save(out, {**{f"image_proj.{k}": v.contiguous() for k, v in ipa.image_proj.items()}, **tensors}, meta)
    return report


def check_fits(ipa: IPAdapterFile, unet, layers: list[str], what: str) -> None:
    """Refuse an IP-Adapter whose layers are not ``unet``'s: another number of cross-attention layers (an adapter
    for another base model, or one not transferred to this student) or other weight shapes."""
    expected = [2 * k + 1 for k in range(len(layers))]
    if sorted(ipa.layers) != expected:
        raise KoalaError(
            f"{ipa.path}: has {len(ipa.layers)} cross-attention layers (ip_adapter.1 .. ip_adapter."
            f"{max(ipa.layers)}) but {what} has {len(layers)}: an IP-Adapter for another base model, or one not "
            "transferred to this student (koala adapter transfer --kind ip-adapter FILE --student DIR --out FILE)?"
        )
    mods = dict(unet.named_modules())
    wrong = []
    for n, name in zip(expected, layers):
        want = tuple(mods[name].to_k.weight.shape)  # [inner dim, cross-attention dim], as to_k_ip / to_v_ip
        for part, w in ipa.layers[n].items():
            if tuple(w.shape) != want:
                wrong.append(f"ip_adapter.{n}.{part}: {tuple(w.shape)} vs {want} at {name}")
    if wrong:
        raise KoalaError(
            f"{ipa.path}: {len(wrong)} weight(s) do not fit {what} (shape mismatch): an IP-Adapter for another base "
            "model? e.g. " + "; ".join(wrong[:3])
        )


def student_layers(ipa: IPAdapterFile, lmap, t_layers: list[str], s_layers: list[str]):
    """``(tensors, kept, dropped_by_stage)``: the student's ``ip_adapter.N.*`` tensors, N the student's numbering."""
    from .lora import _dropped_stage

    t_index = {name: 2 * k + 1 for k, name in enumerate(t_layers)}
    tensors: dict[str, torch.Tensor] = {}
    used = set()
    for k, name in enumerate(s_layers):
        t_name = lmap.teacher_name(name)
        if t_name not in t_index:
            raise KoalaError(
                f"student layer {name} maps to teacher module {t_name}, which is no cross-attention layer of the "
                "teacher; the layer map does not fit (re-create the student with koala compress)"
            )
        n = t_index[t_name]
        used.add(n)
        for part, w in ipa.layers[n].items():
            tensors[f"ip_adapter.{2 * k + 1}.{part}.weight"] = w.contiguous()
    entries = sorted(lmap.entries, key=lambda e: len(e.teacher), reverse=True)
    by_stage = Counter(_dropped_stage(name, entries) for name in t_layers if t_index[name] not in used)
    return tensors, len(s_layers), dict(by_stage)


def _save(out: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from ..utils.files import atomic_file

    with atomic_file(out, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=meta)
