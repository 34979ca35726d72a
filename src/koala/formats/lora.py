"""SDXL LoRAs on KOALA students: read a LoRA file (diffusers / PEFT, older diffusers, or kohya), map it onto a
student through its ``koala_layer_map.json``, write it in diffusers' format.

A LoRA adds ``scale * B @ A`` to a module's weight. A student module initialised from teacher module ``t`` (the
layer map says which) gets ``t``'s A and B; LoRA entries of teacher modules the student does not have (removed
blocks and transformer layers) are dropped and counted by stage. Text-encoder entries carry over unchanged: a
student shares its teacher's text encoders. The output stores ``alpha / rank`` folded into B, so it loads with
diffusers' ``load_lora_weights`` at the same strength without per-module alphas.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..errors import KoalaError
from ..utils.files import refuse_existing

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
}


@dataclass
class LoraModule:
    component: str  # unet / text_encoder / text_encoder_2
    module: str  # diffusers / transformers module name inside the component
    down: torch.Tensor  # A: [rank, in, ...]
    up: torch.Tensor  # B: [out, rank, ...]
    alpha: float | None = None  # None: alpha = rank (scale 1)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change this LoRA makes at scale 1 (what a test compares)."""
        up, down = self.up.flatten(1).float(), self.down.flatten(1).float()
        return (up @ down * self.scale).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoraFile:
    path: str
    format: str  # peft / diffusers-old / kohya
    modules: list[LoraModule]
    metadata: dict = field(default_factory=dict)


_PEFT = re.compile(r"^(?:(unet|text_encoder|text_encoder_2|transformer)\.)?(.+?)\.lora_([AB])(?:\.default)?\.weight$")
_OLD = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_PROC = re.compile(r"^(?:(unet)\.)?(.+?)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_KOHYA = re.compile(r"^(lora_unet_|lora_te1_|lora_te2_|lora_te_)(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_UNSUPPORTED = (
    ("hada_w1", "LoHa (LyCORIS)"),
    ("lokr_w1", "LoKr (LyCORIS)"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    ("lora_mid", "LoCon with a mid tensor (LyCORIS)"),
    ("diff_b", "a full-weight difference"),
)


def read_lora(path: str, resolve_kohya=None) -> LoraFile:
    """Parse a LoRA ``.safetensors`` file. ``resolve_kohya(component, flat_name)`` turns a kohya module name
    (dots written as underscores) into a diffusers module name (or None when no module has that name)."""
    tensors, meta = _read_lora_tensors(path)
    pairs, fmt = _lora_pairs(path, tensors)
    modules = _lora_modules(path, pairs, resolve_kohya, _peft_alpha(meta))
    return LoraFile(path, fmt or "peft", sorted(modules, key=lambda m: (m.component, m.module)), meta)


def _read_lora_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(key -> tensor, metadata) of a LoRA file; a KoalaError for another file type, an empty file or a LoRA
    variant koala does not transfer."""
    from safetensors import safe_open

    from ..utils.weights import check_user_safetensors

    check_user_safetensors(path, "LoRA files")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not tensors:
        raise KoalaError(f"{path}: holds no tensors")
    for marker, what in _UNSUPPORTED:
        if any(marker in k for k in tensors):
            raise KoalaError(f"{path}: a {what} file; koala transfers plain LoRA (A/B matrices) only")
    return tensors, meta


def _key_entry(key: str) -> tuple[str, str, str, str | None] | None:
    """``(component, module, part, format)`` of one key of a LoRA file (part: down / up / alpha; a kohya module is
    its flat name after a NUL; format None: the key does not tell), or None for a key of no known format."""
    m = _PEFT.match(key)
    if m:
        return m.group(1) or "unet", m.group(2), "down" if m.group(3) == "A" else "up", "peft"
    m = _OLD.match(key)
    if m:
        return m.group(1) or "unet", m.group(2), m.group(3), "diffusers-old"
    m = _PROC.match(key)
    if m:
        return (
            "unet",
            f"{m.group(2)}.{m.group(3) if m.group(3) != 'to_out' else 'to_out.0'}",
            m.group(4),
            "diffusers-old",
        )
    m = _KOHYA.match(key)
    if m:
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(3)]
        return KOHYA_PREFIXES[m.group(1)], "\0" + m.group(2), part, "kohya"
    if key.endswith(".alpha"):  # an older diffusers file's network alpha
        comp_mod = key[: -len(".alpha")]
        comp, _, mod = comp_mod.partition(".") if comp_mod.split(".", 1)[0] in COMPONENTS else ("unet", "", comp_mod)
        return comp, mod, "alpha", None
    return None


def _lora_pairs(path: str, tensors: dict[str, torch.Tensor]) -> tuple[dict[tuple[str, str], dict], str | None]:
    """``((component, module) -> {down, up, alpha}, format of the first key that tells)``; a KoalaError naming
    keys of no known format."""
    pairs: dict[tuple[str, str], dict] = {}
    fmt = None
    unknown = []
    for k, tensor in tensors.items():
        entry = _key_entry(k)
        if entry is None:
            unknown.append(k)
            continue
        comp, name, part, key_fmt = entry
        pairs.setdefault((comp, name), {})[part] = tensor
        fmt = fmt or key_fmt
    if unknown:
        raise KoalaError(
            f"{path}: {len(unknown)} key(s) in no LoRA format koala knows (diffusers/PEFT lora_A/lora_B, "
            f"older diffusers lora.down/lora.up, kohya lora_unet_*/lora_te*_ lora_down/lora_up), e.g. "
            f"{', '.join(unknown[:3])}"
        )
    return pairs, fmt


def _lora_modules(path: str, pairs: dict[tuple[str, str], dict], resolve_kohya, alpha_of) -> list[LoraModule]:
    """One :class:`LoraModule` per (component, module), kohya names resolved, each checked whole."""
    modules = []
    for (comp, name), parts in pairs.items():
        if name.startswith("\0"):
            flat = name[1:]
            name = resolve_kohya(comp, flat) if resolve_kohya else None
            if name is None:
                raise KoalaError(
                    f"{path}: kohya module lora_{'unet' if comp == 'unet' else comp}_{flat} matches no "
                    f"module of the teacher's {comp}: a LoRA for another base model (e.g. SD-1.5 on an "
                    "SDXL teacher)?"
                )
        if "down" not in parts or "up" not in parts:
            raise KoalaError(
                f"{path}: module {comp}.{name} has {'no up (B)' if 'down' in parts else 'no down (A)'} "
                "matrix; the file is incomplete"
            )
        down, up = parts["down"], parts["up"]
        if down.shape[0] != up.shape[1]:
            raise KoalaError(
                f"{path}: module {comp}.{name}: rank mismatch, A has {down.shape[0]} rows but B {up.shape[1]} columns"
            )
        alpha = parts.get("alpha")
        alpha = float(alpha.float().item()) if alpha is not None else alpha_of(comp, name)
        modules.append(LoraModule(comp, name, down, up, alpha))
    return modules


def _peft_alpha(meta: dict):
    """``alpha(component, module)`` from diffusers' ``lora_adapter_metadata`` header (each component's LoraConfig,
    stored as ``component.field`` or nested): its alpha_pattern entry for the module, else its lora_alpha; None
    when the file says nothing (alpha = rank)."""
    raw = meta.get("lora_adapter_metadata")
    cfgs: dict[str, dict] = {}
    if raw:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = {}
        for key, value in data.items():
            comp, dot, fld = key.partition(".")
            if dot and comp in COMPONENTS:
                cfgs.setdefault(comp, {})[fld] = value
            elif isinstance(value, dict) and key in COMPONENTS:
                cfgs[key] = value
            else:
                cfgs.setdefault("unet", {})[key] = value

    def alpha(comp: str, module: str):
        cfg = cfgs.get(comp)
        if not cfg or cfg.get("lora_alpha") is None:
            return None
        for pat, a in (cfg.get("alpha_pattern") or {}).items():
            try:
                hit = module == pat or module.endswith("." + pat) or re.fullmatch(pat, module)
            except re.error:  # a pattern that is not a regular expression: names only
                hit = False
            if hit:
                return float(a)
        return float(cfg["lora_alpha"])

    return alpha


# ------------------------------------------------------------------------------------------- transfer
@dataclass
class TransferReport:
    out: str
    source_format: str
    kept: int  # U-Net modules written (a teacher module may feed several student modules)
    dropped: int  # U-Net LoRA modules of removed teacher modules
    dropped_by_stage: dict[str, int]
    text_encoder: int  # text-encoder modules carried over
    ranks: list[int]

    def summary(self) -> str:
        stages = ", ".join(f"{s}: {n}" for s, n in sorted(self.dropped_by_stage.items())) or "none"
        return (
            f"{self.source_format} LoRA -> {self.out}: {self.kept} U-Net modules kept, {self.dropped} dropped "
            f"(removed from the student; by stage: {stages}), {self.text_encoder} text-encoder modules carried over"
        )


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _text_modules(cfgs: dict[str, dict]) -> dict[str, dict[str, str]]:
    """Per text encoder: canonical module name (transformers' ``text_model.`` names, as every LoRA format writes
    them) -> the module's name in the installed transformers (5.x drops ``text_model.`` from CLIPTextModel)."""
    import transformers

    out = {}
    for comp, cfg in cfgs.items():
        arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        with torch.device("meta"):
            model = getattr(transformers, arch)(
                transformers.CLIPTextConfig.from_dict({k: v for k, v in cfg.items() if k != "architectures"})
            )
        out[comp] = {
            (n if n.startswith(("text_model", "text_projection")) else "text_model." + n): n
            for n, _ in model.named_modules()
            if n
        }
    return out


def _ldm_module_names(unet) -> dict[str, str]:
    """diffusers module name -> single-file (SGM) module name, from the tensor rules (of a clean copy of the U-Net
    built on meta from its config: a U-Net already carrying LoRA layers has other parameter names)."""
    from diffusers import UNet2DConditionModel

    from .ldm import unet_rules

    with torch.device("meta"):
        clean = UNet2DConditionModel.from_config(dict(unet.config))
    out = {}
    for r in unet_rules(clean):
        d, ldm = r.diffusers[0], r.ldm
        if d.endswith((".weight", ".bias")) and ldm.endswith((".weight", ".bias")):
            out[d.rsplit(".", 1)[0]] = ldm.rsplit(".", 1)[0]
    return out


def transfer_lora(lora_path: str, student: str, out: str, overwrite: bool = False) -> TransferReport:
    """Map the SDXL LoRA ``lora_path`` onto ``student`` (a student pipeline or U-Net directory with its layer map)
    and write the result to ``out`` (diffusers format, atomically)."""
    from ..arch.layer_map import LayerMap
    from ..families import FAMILIES, get_family, model_dir
    from ..utils.files import read_json

    if not out.endswith(".safetensors"):
        raise KoalaError(f"{out}: name the output LoRA *.safetensors", option="out")
    refuse_existing(out, overwrite, "file")
    lmap = LayerMap.load(student)
    fam = get_family(lmap.family)
    if not fam.lora_transfer:
        covered = ", ".join(f.name for f in FAMILIES.values() if f.lora_transfer)
        raise KoalaError(f"{student}: LoRA transfer covers U-Net students ({covered}), not {fam.label}")
    teacher = fam.build_model(lmap.teacher_config, "meta")
    s_dir = model_dir(student)
    s_model = fam.build_model(read_json(os.path.join(s_dir, "config.json")), "meta")
    te_names = _text_encoder_modules(fam, s_dir)
    lora = read_lora(lora_path, _kohya_resolver(teacher, te_names))
    _check_fits_teacher(lora, teacher, lmap, lora_path)
    tensors, counts = _student_lora(lora, lmap, s_model, te_names, fam, lora_path)
    report = TransferReport(os.path.abspath(out), lora.format, *counts, sorted({m.rank for m in lora.modules}))
    meta = {
        "format": "pt",
        "koala.lora_source": os.path.abspath(lora_path),
        "koala.source_format": lora.format,
        "koala.student": os.path.abspath(student),
        "koala.report": report.summary(),
    }
    _save_lora(out, tensors, meta)
    return report


def _text_encoder_modules(fam, s_dir: str) -> dict[str, dict[str, str]]:
    """:func:`_text_modules` of the student pipeline's text encoders (a U-Net directory inside a pipeline), else of
    the family's real towers."""
    from ..utils.files import read_json

    s_dir = os.path.normpath(s_dir)
    pipe_dir = os.path.dirname(s_dir) if os.path.basename(s_dir) == fam.model_subfolder else None
    classes = {enc: cls for _, enc, cls in fam.text_encoders}
    cfgs = {}
    if pipe_dir:
        for comp in classes:
            f = os.path.join(pipe_dir, comp, "config.json")
            if os.path.isfile(f):
                cfgs[comp] = read_json(f)
    return _text_modules(
        cfgs or {enc: {"architectures": [classes[enc]], **tower} for enc, tower in zip(classes, fam.real_text_towers)}
    )


def _kohya_resolver(teacher, te_names: dict[str, dict[str, str]]):
    """``resolve_kohya`` for :func:`read_lora`: a kohya flat name (of a diffusers or single-file U-Net module, or a
    text-encoder module) -> the teacher's module name."""
    kohya = {("unet", _flat(n)): n for n, _ in teacher.named_modules() if n}
    kohya.update({("unet", _flat(ldm)): d for d, ldm in _ldm_module_names(teacher).items()})
    for comp, names in te_names.items():
        kohya.update({(comp, _flat(c)): c for c in names})
    return lambda comp, flat: kohya.get((comp, flat))


def _check_fits_teacher(lora: LoraFile, teacher, lmap, lora_path: str) -> None:
    """Every U-Net entry is a teacher module with matching sizes: else it is a LoRA for another base."""
    t_mods = dict(teacher.named_modules())
    wrong = []
    for m in lora.modules:
        if m.component != "unet":
            continue
        w = getattr(t_mods.get(m.module), "weight", None)
        if w is None:
            wrong.append(f"{m.module}: no such module in the teacher")
        elif w.shape[0] != m.up.shape[0] or w.shape[1] != m.down.shape[1]:
            wrong.append(
                f"{m.module}: LoRA {m.up.shape[0]}x{tuple(m.down.shape[1:])} vs teacher weight {tuple(w.shape)}"
            )
    if wrong:
        raise KoalaError(
            f"{lora_path}: {len(wrong)} LoRA module(s) do not fit the student's teacher "
            f"({lmap.meta.get('teacher_path', 'from the layer map')}): a LoRA for another base model? e.g. "
            + "; ".join(wrong[:3])
        )


def _student_lora(lora: LoraFile, lmap, s_model, te_names, fam, lora_path: str):
    """``(tensors, (kept, dropped, dropped_by_stage, text_encoder))``: the student's LoRA tensors in diffusers'
    format (``alpha / rank`` folded into B); each U-Net module goes to every student module initialised from it."""
    back: dict[str, list[str]] = {}  # teacher module -> student modules initialised from it
    for name, _ in s_model.named_modules():
        if name and lmap.entry(name) is not None:
            back.setdefault(lmap.teacher_name(name), []).append(name)
    t_entries = sorted(lmap.entries, key=lambda e: len(e.teacher), reverse=True)
    tensors: dict[str, torch.Tensor] = {}
    kept = dropped = te = 0
    by_stage: Counter = Counter()
    for m in lora.modules:
        up = (m.up.float() * m.scale).to(m.up.dtype) if m.scale != 1.0 else m.up
        if m.component != "unet":
            targets = [f"{m.component}.{_text_encoder_module(m, te_names, fam, lora_path)}"]
            te += 1
        else:
            targets = [f"unet.{s}" for s in back.get(m.module, [])]
            kept += len(targets)
            if not targets:
                dropped += 1
                by_stage[_dropped_stage(m.module, t_entries)] += 1
        for t in targets:
            tensors[f"{t}.lora_A.weight"] = m.down.contiguous()
            tensors[f"{t}.lora_B.weight"] = up.contiguous()
    if not tensors:
        raise KoalaError(
            f"{lora_path}: none of its {len(lora.modules)} modules exist in the student; nothing to write"
        )
    return tensors, (kept, dropped, dict(by_stage), te)


def _text_encoder_module(m: LoraModule, te_names: dict[str, dict[str, str]], fam, lora_path: str) -> str:
    """The student's name of a text-encoder LoRA module (the student shares its teacher's text encoders)."""
    if m.component not in {enc for _, enc, _ in fam.text_encoders}:
        raise KoalaError(f"{lora_path}: has {m.component} entries but a {fam.label} model has no {m.component}")
    names = te_names[m.component]
    canonical = m.module if m.module in names else "text_model." + m.module
    if canonical not in names:
        raise KoalaError(f"{lora_path}: {m.component} module {m.module} is not in the student's {m.component}")
    return names[canonical]


def _dropped_stage(module: str, t_entries) -> str:
    """The stage of a teacher module the student does not have: its layer-map entry's (the longest teacher name it
    is inside), else from its name."""
    return next(
        (e.stage for e in t_entries if module == e.teacher or module.startswith(e.teacher + ".")),
        _stage_of(module),
    )


def _save_lora(out: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from ..utils.files import atomic_file

    with atomic_file(out, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=meta)


def _stage_of(module: str) -> str:
    """A teacher module's stage name when the layer map has no entry for it (a block the student dropped whole)."""
    parts = module.split(".")
    if parts[0] == "down_blocks":
        return f"DW-{int(parts[1]) + 1}"
    if parts[0] == "up_blocks":
        return f"UP-{int(parts[1]) + 1}"
    if parts[0] == "mid_block":
        return "MID"
    return "IO"


# ------------------------------------------------------------------------------------------- applying
def parse_lora_arg(value: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` -> (file, scale)."""
    path, scale = value, 1.0
    if ":" in value and not os.path.exists(value):
        head, _, tail = value.rpartition(":")
        try:
            path, scale = head, float(tail)
        except ValueError:
            raise KoalaError(
                f"--lora {value}: the part after ':' must be a number (the LoRA scale)", option="lora"
            ) from None
    if not os.path.isfile(path):
        raise KoalaError(f"--lora {path}: no such file", option="lora")
    return path, scale


def check_lora_fits(path: str, unet) -> LoraFile:
    """Refuse a LoRA whose U-Net modules the model lacks (e.g. an SDXL LoRA not yet transferred to a student)."""
    mods = dict(unet.named_modules())
    kohya = {_flat(n): n for n in mods if n}
    try:
        kohya.update({_flat(ldm): d for d, ldm in _ldm_module_names(unet).items()})
    except KoalaError:
        pass
    lora = read_lora(path, lambda comp, flat: kohya.get(flat) if comp == "unet" else flat)
    missing = [m.module for m in lora.modules if m.component == "unet" and m.module not in mods]
    if missing:
        raise KoalaError(
            f"{path}: {len(missing)} of its U-Net modules are not in this model (e.g. {missing[0]}); for a "
            "KOALA student transfer an SDXL LoRA first: koala lora transfer LORA --student DIR --out FILE",
            option="lora",
        )
    return lora


def apply_loras(pipe, loras: list[tuple[str, float]]) -> list[str]:
    """Load LoRA files into a diffusers pipeline with their scales (diffusers' ``load_lora_weights`` +
    ``set_adapters``); returns the adapter names."""
    from ..families import denoiser_of
    from ..utils.extras import require

    require("peft", "lora", "loading a LoRA")
    names = []
    for i, (path, _) in enumerate(loras):
        check_lora_fits(path, denoiser_of(pipe))
        name = f"lora{i}_{re.sub(r'[^A-Za-z0-9_]', '_', os.path.splitext(os.path.basename(path))[0])}"
        pipe.load_lora_weights(path, adapter_name=name)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    return names
