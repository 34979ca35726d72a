"""ONNX export of a U-Net pipeline (SDXL / SD-1.x students and teachers), checked with onnxruntime.

``export_onnx(PIPE, OUT)`` writes Optimum's diffusers layout::

    OUT/unet/model.onnx            sample, timestep, encoder_hidden_states[, text_embeds, time_ids] -> out_sample
    OUT/vae_decoder/model.onnx     latent_sample -> sample
    OUT/text_encoder/model.onnx    input_ids -> last_hidden_state, pooler_output, hidden_states.0..N
    OUT/text_encoder_2/model.onnx  input_ids -> text_embeds, last_hidden_state, hidden_states.0..N   (SDXL)
    OUT/tokenizer[_2]/, OUT/scheduler/, each graph's config.json, the U-Net's koala_layer_map.json
    OUT/koala_onnx.json            what was exported (the manifest :mod:`koala.inference.onnx` reads)

The U-Net's input and output names are Optimum's SDXL / SD export's; batch, spatial size and token count are
dynamic axes. After export every graph runs on onnxruntime (CPU provider) at the export's shapes and at a second
batch and size, and must equal the torch module within ``ONNX_RTOL`` (max abs difference / max abs value): a graph
that does not is refused and nothing is written. Graphs over 2 GB keep their weights in external data files beside
``model.onnx`` (protobuf's limit).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from ..errors import KoalaError
from ..utils.extras import require
from ..utils.files import atomic_output_dir, atomic_write_json, read_json, refuse_existing

EXPORTERS = ("dynamo", "torchscript")  # torch.onnx.export(dynamo=True) (onnxscript) / the older TorchScript one
OPSET = 18
ONNX_RTOL = 1e-3  # the export check: max |onnx - torch| / max |torch| per output
MANIFEST = "koala_onnx.json"
ONNX_FAMILIES = ("sdxl", "sd")  # the U-Net families the export covers
MODEL_FILE = "model.onnx"


@dataclass
class GraphSpec:
    """One graph to export: the torch module (positional inputs in ``inputs`` order), named inputs and outputs,
    each input's dynamic axes, and a function that makes random inputs for (batch, size)."""

    name: str  # folder: unet, vae_decoder, text_encoder, text_encoder_2
    module: torch.nn.Module
    inputs: list[str]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]
    make_inputs: object  # (batch, size, generator) -> tuple of tensors
    shapes: tuple[tuple[int, int], ...]  # (batch, size) of the export (first) and of the check's second case
    config_dir: str  # where the component's config.json is
    out_dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # output axes (TorchScript exporter)


@dataclass
class OnnxExportResult:
    out: str
    family: str
    exporter: str
    graphs: dict[str, dict] = field(default_factory=dict)  # name -> manifest entry (inputs, outputs, check, bytes)


# ----------------------------------------------------------------------------------------------- the graphs
class _UNetGraph(torch.nn.Module):
    """The diffusers U-Net with Optimum's flat input list; SDXL's added conditions as two plain inputs."""

    def __init__(self, unet, added: bool):
        super().__init__()
        self.unet, self.added = unet, added

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.added else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class _VAEDecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _TextGraph(torch.nn.Module):
    """A CLIP text tower with every hidden state as its own output (the SDXL pipeline reads the penultimate)."""

    def __init__(self, encoder, first: str):
        super().__init__()
        self.encoder, self.first = encoder, first

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        second = out.pooler_output if self.first == "last_hidden_state" else out.last_hidden_state
        return (getattr(out, self.first), second, *out.hidden_states)


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen)


def unet_spec(unet, folder: str) -> GraphSpec:
    cfg = unet.config
    if cfg.get("time_cond_proj_dim") is not None:
        raise KoalaError(
            f"{folder}/config.json: time_cond_proj_dim is set (a guidance-embedded U-Net); the ONNX export covers "
            "U-Nets without timestep_cond",
            option="src",
        )
    added = cfg.get("addition_embed_type") == "text_time"
    names = ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if added else [])
    n_ids = 6  # SDXL's micro-conditions: original size, crop, target size
    text_dim = (cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim * n_ids) if added else 0

    def make(batch, size, gen):
        x = [_rand(gen, batch, cfg.in_channels, size, size + 8), torch.full((batch,), 500.0)]
        x.append(_rand(gen, batch, 77, cfg.cross_attention_dim))
        if added:
            x += [_rand(gen, batch, text_dim), torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1)]
        return tuple(x)

    dynamic = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"}}
    dynamic["encoder_hidden_states"] = {0: "batch", 1: "sequence"}
    if added:
        dynamic |= {"text_embeds": {0: "batch"}, "time_ids": {0: "batch"}}
    size = max(8, (cfg.sample_size or 64) // 4 // 8 * 8)
    shapes = ((2, size), (1, size + 8))
    out = {"out_sample": dynamic["sample"]}
    return GraphSpec("unet", _UNetGraph(unet, added), names, ["out_sample"], dynamic, make, shapes, folder, out)


def vae_decoder_spec(vae, folder: str) -> GraphSpec:
    ch = vae.config.latent_channels

    def make(batch, size, gen):
        return (_rand(gen, batch, ch, size, size + 8),)

    dynamic = {"latent_sample": {0: "batch", 2: "height", 3: "width"}}
    out = {"sample": {0: "batch", 2: "image_height", 3: "image_width"}}
    graph = _VAEDecoderGraph(vae)
    shapes = ((2, 8), (1, 16))  # the first is the export's: a batch of 1 would make the batch axis static
    return GraphSpec("vae_decoder", graph, ["latent_sample"], ["sample"], dynamic, make, shapes, folder, out)


def text_spec(name: str, encoder, folder: str) -> GraphSpec:
    projection = hasattr(encoder, "text_projection")
    first, second = ("text_embeds", "last_hidden_state") if projection else ("last_hidden_state", "pooler_output")
    layers = encoder.config.num_hidden_layers
    outputs = [first, second, *[f"hidden_states.{i}" for i in range(layers + 1)]]
    vocab, tokens = encoder.config.vocab_size, encoder.config.max_position_embeddings
    eos = encoder.config.eos_token_id

    def make(batch, size, gen):
        ids = torch.randint(0, vocab, (batch, min(size, tokens)), generator=gen)
        if eos is not None and 0 <= eos < vocab:
            ids[:, -1] = eos  # CLIP pools at the end token
        return (ids,)

    dynamic = {"input_ids": {0: "batch", 1: "sequence"}}
    shapes = ((2, tokens), (3, max(2, tokens // 2)))
    return GraphSpec(name, _TextGraph(encoder, first), ["input_ids"], outputs, dynamic, make, shapes, folder)


def graph_specs(pipe, src: str, fam) -> list[GraphSpec]:
    """The graphs of a loaded pipeline: U-Net, VAE decoder, then each text encoder of the family."""
    specs = [unet_spec(pipe.unet, os.path.join(src, "unet")), vae_decoder_spec(pipe.vae, os.path.join(src, "vae"))]
    for _, enc, _ in fam.text_encoders:
        specs.append(text_spec(enc, getattr(pipe, enc), os.path.join(src, enc)))
    return specs


# ----------------------------------------------------------------------------------------------- export and check
def _dims(spec: GraphSpec, limits: dict[str, int]) -> dict:
    """torch.export dynamic shapes from the spec's named axes (one Dim per name, shared across inputs)."""
    made: dict[str, object] = {}

    def dim(label):
        if label not in made:
            made[label] = torch.export.Dim(label, max=limits[label]) if label in limits else torch.export.Dim(label)
        return made[label]

    return {n: {ax: dim(label) for ax, label in spec.dynamic[n].items()} for n in spec.inputs}


def export_graph(spec: GraphSpec, path: str, exporter: str = "dynamo", opset: int = OPSET) -> None:
    """Write ``spec``'s module as ONNX to ``path`` with its dynamic axes; weights over 2 GB go to external data."""
    example = spec.make_inputs(*spec.shapes[0], torch.Generator().manual_seed(0))
    big = sum(p.numel() * p.element_size() for p in spec.module.parameters()) > 2**31 - 2**27
    kw = dict(input_names=spec.inputs, output_names=spec.outputs, opset_version=opset)
    spec.module.eval()
    with torch.no_grad():
        if exporter == "torchscript":
            axes = spec.dynamic | spec.out_dynamic
            torch.onnx.export(spec.module, example, path, dynamo=False, dynamic_axes=axes, **kw)
            return one_data_file(path)
        limits = {"sequence": example[0].shape[1]} if spec.name.startswith("text_encoder") else {}
        prog = torch.onnx.export(
            spec.module, example, dynamo=True, dynamic_shapes=_dims(spec, limits), optimize=True, **kw
        )
        prog.save(path, external_data=big)


def one_data_file(path: str) -> None:
    """Gather a graph's external data into one ``model.onnx.data`` beside it (the TorchScript exporter writes one
    file per tensor for a graph over 2 GB)."""
    folder = os.path.dirname(os.path.abspath(path))
    extra = [f for f in os.listdir(folder) if f != os.path.basename(path)]
    if not extra:
        return
    import onnx

    model = onnx.load(path)  # with its external data
    for f in extra:
        os.remove(os.path.join(folder, f))
    onnx.save_model(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=f"{MODEL_FILE}.data"
    )


def rel_error(got, ref) -> float:
    """max |got - ref| / max |ref| (as float64)."""
    ref = ref.detach().double().numpy() if isinstance(ref, torch.Tensor) else ref
    import numpy as np

    diff = np.abs(np.asarray(got, dtype=np.float64) - ref).max()
    return float(diff / max(np.abs(ref).max(), 1e-12))


def cpu_session(path: str):
    """An onnxruntime CPU session with torch's thread count."""
    ort = require("onnxruntime", "onnx", "running an ONNX graph")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def check_graph(spec: GraphSpec, path: str, rtol: float = ONNX_RTOL, sess=None) -> list[dict]:
    """Run the graph on onnxruntime (CPU provider) at each of the spec's (batch, size) cases with random inputs and
    compare with the torch module; a KoalaError when an output differs by more than ``rtol``."""
    sess = sess or cpu_session(path)
    gen = torch.Generator().manual_seed(1)
    cases = []
    for batch, size in spec.shapes:
        x = spec.make_inputs(batch, size, gen)
        with torch.no_grad():
            ref = spec.module(*x)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(spec.outputs, {n: t.numpy() for n, t in zip(spec.inputs, x)})
        errs = {name: rel_error(g, r) for name, g, r in zip(spec.outputs, got, ref)}
        worst = max(errs, key=errs.get)
        shapes = {n: list(t.shape) for n, t in zip(spec.inputs, x)}
        cases.append({"inputs": shapes, "max_rel_error": errs[worst], "worst_output": worst})
        if not errs[worst] <= rtol:
            raise KoalaError(
                f"ONNX check of {spec.name}: output {worst} differs from torch by {errs[worst]:.2e} (relative) at "
                f"inputs {shapes}; more than {rtol:g}. Nothing was written; try the other exporter "
                f"({' / '.join(EXPORTERS)}) or another opset",
                option="format",
            )
    return cases


def graph_signature(sess) -> dict:
    """Input and output names with their (symbolic) shapes, as onnxruntime reads the graph (an InferenceSession)."""
    return {
        "inputs": {i.name: list(i.shape) for i in sess.get_inputs()},
        "outputs": {o.name: list(o.shape) for o in sess.get_outputs()},
    }


# ----------------------------------------------------------------------------------------------- the pipeline
def onnx_family(src: str):
    """The family of the pipeline directory ``src`` when koala exports it to ONNX; else a KoalaError naming what
    ``src`` is and what is covered."""
    from ..families import FAMILIES, family_of, model_dir_kind

    covered = ", ".join(f"{FAMILIES[n].label} ({FAMILIES[n].pipeline_class_name})" for n in ONNX_FAMILIES)
    if os.path.isfile(src):
        raise KoalaError(
            f"{src} is a file; ONNX export reads a diffusers pipeline directory (convert a single file first: "
            "koala export FILE --format diffusers)",
            option="src",
        )
    if model_dir_kind(src) != "pipeline":
        raise KoalaError(
            f"{src} is a model directory (no model_index.json); ONNX export needs the whole pipeline directory "
            "(U-Net, VAE, text encoders, tokenizers, scheduler)",
            option="src",
        )
    cls = read_json(os.path.join(src, "model_index.json")).get("_class_name")
    fam = next((f for f in FAMILIES.values() if cls in (f.pipeline_class_names or (f.pipeline_class_name,))), None)
    if fam is None:
        raise KoalaError(
            f"{src}/model_index.json: {cls!r} is a pipeline koala does not know; ONNX export covers {covered}",
            option="src",
        )
    if fam.name not in ONNX_FAMILIES:
        raise KoalaError(f"{src}: {cls} ({fam.label}) has no ONNX export in koala; it covers {covered}", option="src")
    return family_of(src, fam)  # checks the U-Net's topology


def _pipeline_config(src: str) -> dict:
    """model_index.json's settings that are not components (e.g. SDXL's force_zeros_for_empty_prompt)."""
    index = read_json(os.path.join(src, "model_index.json"))
    return {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}


def _copy_rest(src: str, out: str, fam) -> list[str]:
    """Tokenizers, scheduler and the U-Net's layer map (its recorded sampling) beside the graphs."""
    from ..arch.layer_map import LAYER_MAP_FILE

    copied = []
    for sub in [t for t, _, _ in fam.text_encoders] + ["scheduler"]:
        if os.path.isdir(os.path.join(src, sub)) and not os.path.exists(os.path.join(out, sub)):
            shutil.copytree(os.path.join(src, sub), os.path.join(out, sub))
            copied.append(sub)
    layer_map = os.path.join(src, "unet", LAYER_MAP_FILE)
    if os.path.isfile(layer_map):
        shutil.copy(layer_map, os.path.join(out, "unet", LAYER_MAP_FILE))
        copied.append(f"unet/{LAYER_MAP_FILE}")
    return copied


def export_onnx(
    src: str,
    out: str,
    *,
    exporter: str = "dynamo",
    opset: int = OPSET,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
) -> OnnxExportResult:
    """Export the pipeline directory ``src`` (SDXL or SD-1.x) to ONNX in ``out`` (atomically); see the module doc."""
    if exporter not in EXPORTERS:
        raise KoalaError(f"exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}", option="exporter")
    fam = onnx_family(src)
    onnx = require("onnx", "onnx", "ONNX export")
    if not 17 <= opset <= onnx.defs.onnx_opset_version():
        raise KoalaError(
            f"opset {opset}: choose one from 17 to {onnx.defs.onnx_opset_version()} (this onnx's newest)",
            option="opset",
        )
    require("onnxruntime", "onnx", "the ONNX export's check")
    if exporter == "dynamo":
        require("onnxscript", "onnx", "torch's dynamo ONNX exporter")
    refuse_existing(out, overwrite)
    pipe = fam.pipeline_class_of(src).from_pretrained(src, **fam.pipeline_load_kwargs, dtype=torch.float32)
    specs = graph_specs(pipe, src, fam)
    res = OnnxExportResult(os.path.abspath(out), fam.name, exporter)
    with atomic_output_dir(out, overwrite) as tmp:
        for spec in _progress(specs, progress):
            res.graphs[spec.name] = _export_one(spec, tmp, exporter, opset, log)
        copied = _copy_rest(src, tmp, fam)
        atomic_write_json(os.path.join(tmp, MANIFEST), _manifest(src, fam, res, opset, copied))
    return res


def _progress(specs, on: bool):
    from tqdm.auto import tqdm

    return tqdm(specs, desc="ONNX export", unit="graph", disable=not on, leave=False)


def _export_one(spec: GraphSpec, out: str, exporter: str, opset: int, log) -> dict:
    folder = os.path.join(out, spec.name)
    os.makedirs(folder)
    path = os.path.join(folder, MODEL_FILE)
    t0 = time.perf_counter()
    export_graph(spec, path, exporter, opset)
    secs = time.perf_counter() - t0
    sess = cpu_session(path)
    check = check_graph(spec, path, ONNX_RTOL, sess)
    shutil.copy(os.path.join(spec.config_dir, "config.json"), os.path.join(folder, "config.json"))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    worst = max(c["max_rel_error"] for c in check)
    log(f"{spec.name}: exported in {secs:.1f} s, {size / 2**20:.1f} MiB; onnxruntime vs torch: {worst:.1e} (max rel.)")
    return {
        "file": f"{spec.name}/{MODEL_FILE}",
        **graph_signature(sess),
        "check": check,
        "export_seconds": round(secs, 2),
        "bytes": size,
    }


def _manifest(src: str, fam, res: OnnxExportResult, opset: int, copied: list[str]) -> dict:
    import onnx
    import onnxruntime

    return {
        "format": "koala-onnx",
        "version": 1,
        "family": fam.name,
        "pipeline_class": read_json(os.path.join(src, "model_index.json")).get("_class_name"),
        "pipeline_config": _pipeline_config(src),
        "source": os.path.abspath(src),
        "exporter": res.exporter,
        "opset": opset,
        "dtype": "float32",
        "check_rtol": ONNX_RTOL,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "graphs": res.graphs,
        "copied": copied,
    }


def read_manifest(folder: str) -> dict:
    """The manifest of an ONNX export directory, else a KoalaError saying what ``folder`` lacks."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise KoalaError(
            f"{folder}: no {MANIFEST}; give a directory written by koala export --format onnx", option="onnx"
        )
    manifest = read_json(path)
    if manifest.get("format") != "koala-onnx":
        raise KoalaError(f"{path}: not a koala ONNX manifest (format {manifest.get('format')!r})", option="onnx")
    graphs = manifest.get("graphs", {}).values()
    missing = [g["file"] for g in graphs if not os.path.isfile(os.path.join(folder, g["file"]))]
    if missing:
        raise KoalaError(f"{folder}: missing {', '.join(missing)}; export again", option="onnx")
    return manifest
