"""Quantized students: ``koala quantize DIR --scheme S --out OUT`` and what loading one needs.

The denoiser's ``nn.Linear`` layers (attention projections, feed-forwards, time / text embeddings, proj_in/out) are
quantized with torchao through diffusers' ``TorchAoConfig``; convolutions, norms and the rest keep full precision
(torchao 0.18 quantizes Linear layers only). The output is a diffusers model folder: ``config.json`` records the
torchao config (``quantization_config``) and ``diffusion_pytorch_model.safetensors`` holds the quantized tensors
flattened into plain tensors plus JSON metadata (torchao's safetensors support). Loading it back is diffusers'
``from_pretrained``: the metadata names classes from torchao's allow-list, nothing is unpickled.

Schemes (``SCHEMES``): ``int8-weight`` (int8 weights per output row, activations in the compute dtype),
``int8-dynamic`` (int8 weights and per-token int8 activations, int8 matmuls), ``int4-weight`` (int4 weights in
groups of 32, stored unpacked one value a byte: torchao's packed int4 layouts need CUDA bf16 or the mslk package)
and ``fp8`` (float8 e4m3 weights and dynamic activations: needs a CUDA GPU of compute capability 8.9 or newer;
torchao has no CPU path for it and quantizing alone already asks for the GPU).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import KoalaError
from ..families import family_of, model_dir, model_dir_kind
from ..utils.devices import parse_device
from ..utils.files import atomic_output_dir, check_output_folder, read_json, refuse_existing


@dataclass(frozen=True)
class Scheme:
    name: str
    torchao_class: str  # the torchao config class diffusers records in config.json's quantization_config
    summary: str
    needs_fp8_gpu: bool = False


SCHEMES = {
    s.name: s
    for s in (
        Scheme("int8-weight", "Int8WeightOnlyConfig", "int8 weights (one scale per output row), fp activations"),
        Scheme("int8-dynamic", "Int8DynamicActivationInt8WeightConfig", "int8 weights and per-token int8 activations"),
        Scheme("int4-weight", "IntxWeightOnlyConfig", "int4 weights in groups of 32 (stored one value a byte)"),
        Scheme(
            "fp8", "Float8DynamicActivationFloat8WeightConfig", "float8 e4m3 weights and dynamic activations", True
        ),
    )
}
INT4_GROUP = 32  # int4-weight: one scale per 32 input features; a Linear whose width it does not divide stays fp
FP8_MIN_CAPABILITY = (8, 9)  # torchao's float8 matmul: Ada / Hopper or newer (L4, L40, H100, H200)


def torchao():
    """``import torchao`` (quietly: its optional CUDA kernels log a warning each on a CPU build), or a KoalaError
    naming the ``quantize`` extra."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from ..utils.extras import require

    return require("torchao", "quantize", "quantized students")


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise KoalaError(f"scheme {name!r}: choose one of {', '.join(SCHEMES)}", option="scheme")
    return SCHEMES[name]


def check_scheme_runs(scheme: str, device: str | torch.device) -> None:
    """A KoalaError (option ``device``) naming why ``device`` cannot run ``scheme``: fp8 off a CUDA GPU of compute
    capability 8.9+ (torchao's float8 activation x float8 weight path has no CPU kernel)."""
    sch = get_scheme(scheme)
    if not sch.needs_fp8_gpu:
        return
    dev = torch.device(device)
    alternative = "; on this device use int8-dynamic or int8-weight"
    if dev.type != "cuda":
        raise KoalaError(
            f"scheme fp8 cannot run on {dev.type}: torchao's float8 (dynamic activation x weight) matmul needs a "
            f"CUDA GPU of compute capability {'.'.join(map(str, FP8_MIN_CAPABILITY))} or newer (Ada, Hopper: "
            f"L4, H100, ...) and has no CPU kernel{alternative}",
            option="device",
        )
    cap = torch.cuda.get_device_capability(dev)
    if cap < FP8_MIN_CAPABILITY:
        raise KoalaError(
            f"scheme fp8 cannot run on {torch.cuda.get_device_name(dev)} (compute capability "
            f"{cap[0]}.{cap[1]}): torchao's float8 matmul needs {'.'.join(map(str, FP8_MIN_CAPABILITY))} or "
            f"newer{alternative}",
            option="device",
        )


def torchao_config(scheme: str):
    """The torchao config of ``scheme``."""
    get_scheme(scheme)
    q = torchao().quantization
    if scheme == "int8-weight":
        return q.Int8WeightOnlyConfig()
    if scheme == "int8-dynamic":
        return q.Int8DynamicActivationInt8WeightConfig()
    if scheme == "int4-weight":
        from torchao.quantization.granularity import PerGroup

        return q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))
    return q.Float8DynamicActivationFloat8WeightConfig()


def quantize_module(module: torch.nn.Module, scheme: str) -> torch.nn.Module:
    """Quantize ``module``'s Linear layers in place with ``scheme`` (in memory: benchmarks, drift), as
    :func:`quantize_dir` does."""
    torchao().quantization.quantize_(module, torchao_config(scheme), filter_fn=lambda m, _: _fits(m, scheme))
    return module


def _fits(module: torch.nn.Module, scheme: str) -> bool:
    """Whether ``scheme`` quantizes ``module``: every Linear, except under int4-weight one whose input width
    ``INT4_GROUP`` does not divide (tiny test models; none in SDXL-size students), which stays in full precision."""
    return isinstance(module, torch.nn.Linear) and (scheme != "int4-weight" or module.in_features % INT4_GROUP == 0)


def scheme_of_config(config: dict) -> str | None:
    """The koala scheme a denoiser config records (``quantization_config`` written by :func:`quantize_dir`), None
    for a full-precision model; a KoalaError for a quantization koala did not write."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    quant_type = qc.get("quant_type") if qc.get("quant_method") == "torchao" else None
    cls = (quant_type or {}).get("default", {}).get("_type") if isinstance(quant_type, dict) else None
    found = next((s.name for s in SCHEMES.values() if s.torchao_class == cls), None)
    if found is None:
        raise KoalaError(
            f"the model is quantized with {qc.get('quant_method')} {cls or quant_type}, which koala does not load; "
            f"quantize the full-precision student with koala quantize --scheme {'|'.join(SCHEMES)}"
        )
    return found


def scheme_of_dir(path: str) -> str | None:
    """The koala scheme of a model or pipeline directory's denoiser (None: full precision)."""
    return scheme_of_config(read_json(os.path.join(model_dir(path), "config.json")))


def check_loadable(path: str, device: str | torch.device) -> str | None:
    """Before loading the denoiser of ``path``: its scheme (None: full precision), with torchao importable and
    ``device`` able to run it (else a KoalaError naming why)."""
    scheme = scheme_of_dir(path)
    if scheme:
        torchao()
        check_scheme_runs(scheme, device)
    return scheme


@dataclass
class QuantizeResult:
    out: str
    scheme: str
    family: str
    quantized_layers: int
    linear_params: int  # parameters in the quantized Linear weights
    total_params: int
    bytes_before: int  # the denoiser's weight files
    bytes_after: int


def quantize_dir(
    src: str, scheme: str, out: str, device: str | None = None, overwrite: bool = False, log: Callable = print
) -> QuantizeResult:
    """Quantize the denoiser of ``src`` (a student U-Net / DiT folder, or a pipeline folder) with ``scheme`` into
    ``out``: the same kind of folder, every other file copied. Everything is checked before anything is written;
    ``out`` appears whole or not at all."""
    sch = get_scheme(scheme)
    dev = parse_device(device)
    kind = model_dir_kind(src)
    fam = family_of(src)  # a model koala does not know is refused here, naming why
    denoiser = model_dir(src)
    if scheme_of_dir(src):
        raise KoalaError(f"{src} is already quantized ({scheme_of_dir(src)}); quantize the full-precision student")
    torchao()
    check_scheme_runs(sch.name, dev)
    if os.path.abspath(out) == os.path.abspath(src):
        raise KoalaError(f"--out {out} is the input folder; choose another output folder", option="out")
    check_output_folder(out)
    refuse_existing(out, overwrite)
    log(f"quantizing {denoiser} ({fam.label}) with {sch.name}: {sch.summary}")
    model = _load_quantized(fam, denoiser, sch.name, dev)
    with atomic_output_dir(out, overwrite) as tmp:
        target = os.path.join(tmp, fam.model_subfolder) if kind == "pipeline" else tmp
        if kind == "pipeline":
            _copy_tree(src, tmp, skip=os.path.relpath(denoiser, src))
        model.save_pretrained(target, safe_serialization=True)
        _copy_tree(denoiser, target, skip_weights=True)
    layers, linear = _linear_stats(model)
    total = sum(p.numel() for p in model.parameters())
    after = _weight_bytes(model_dir(out))
    return QuantizeResult(out, sch.name, fam.name, layers, linear, total, _weight_bytes(denoiser), after)


def _load_quantized(fam, denoiser: str, scheme: str, device: torch.device):
    """The denoiser of ``denoiser`` loaded in fp32 and quantized by diffusers' torchao quantizer on ``device``."""
    from diffusers import TorchAoConfig

    from ..utils.weights import check_weights

    check_weights(denoiser)
    kw = {"device_map": str(device)} if device.type == "cuda" else {}
    keep = _unfit_linears(fam, denoiser, scheme)
    quiet = logging.getLogger("diffusers.quantizers")  # its "only bfloat16 is supported" warning: fp32 works
    previous = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return fam.model_class.from_pretrained(
            denoiser,
            quantization_config=TorchAoConfig(torchao_config(scheme), modules_to_not_convert=keep or None),
            torch_dtype=torch.float32,
            **kw,
        ).eval()
    finally:
        quiet.setLevel(previous)


def _unfit_linears(fam, denoiser: str, scheme: str) -> list[str]:
    """The Linear layers ``scheme`` leaves in full precision (:func:`_fits`)."""
    model = fam.build_model(read_json(os.path.join(denoiser, "config.json")), "meta")
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not _fits(m, scheme)]


def _copy_tree(src: str, dst: str, skip: str | None = None, skip_weights: bool = False) -> None:
    """Copy ``src`` into ``dst``: everything but the subfolder ``skip``; with ``skip_weights`` only the files beside
    a model's weights (layer map, card), not its weights or config."""
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name == skip or name.startswith("."):
            continue
        if skip_weights and (os.path.isdir(path) or name == "config.json" or _is_weights(name)):
            continue
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dst, name))
        else:
            shutil.copy2(path, os.path.join(dst, name))


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) or name.endswith(".index.json")


def _weight_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if _is_weights(n))


def _linear_stats(model: torch.nn.Module) -> tuple[int, int]:
    """(number of quantized Linear layers, their weight parameters)."""
    from torchao.utils import TorchAOBaseTensor

    found = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and isinstance(m.weight, TorchAOBaseTensor)]
    return len(found), sum(m.weight.numel() for m in found)


@torch.no_grad()
def layer_drift(reference: torch.nn.Module, quantized: torch.nn.Module, run: Callable) -> dict:
    """Per-layer output error of ``quantized`` against ``reference`` (the same architecture, unquantized) on the
    same inputs: ``run(model)`` calls a model's forward; while ``reference`` runs, each quantized Linear is fed the
    reference layer's own input, so each layer's error is its own (not what earlier layers passed on). Returns
    ``{"layers": {name: relative L2 error}, "output": relative error of the whole forward}``."""
    qmods = dict(quantized.named_modules())
    layers: dict[str, float] = {}

    def hook(name):
        def fn(mod, args, out):
            q_out = qmods[name](*args)
            layers[name] = _rel(q_out, out)

        return fn

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in reference.named_modules()
        if isinstance(m, torch.nn.Linear) and _is_quantized(qmods.get(n))
    ]
    try:
        ref_out = run(reference)
    finally:
        for h in handles:
            h.remove()
    return {"layers": layers, "output": _rel(run(quantized), ref_out)}


def _is_quantized(module) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(getattr(module, "weight", None), TorchAOBaseTensor)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
