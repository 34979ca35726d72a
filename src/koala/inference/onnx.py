"""Run an ONNX export (``koala export --format onnx``) on onnxruntime, inside diffusers' own pipeline.

The diffusers pipeline class of the export's family (``StableDiffusionXLPipeline`` / ``StableDiffusionPipeline``)
is built with thin stand-ins for its U-Net, VAE and text encoders: ``torch.nn.Module``\\ s without weights whose
calls run an onnxruntime ``InferenceSession`` and return diffusers' / transformers' output types. Everything
else (tokenizers, the scheduler, classifier-free guidance, SDXL's micro-conditioning, latents from the seed,
post-processing) is the torch pipeline's own code, so an image equals the torch pipeline's up to the graphs'
float differences. The providers: CUDA when ``device`` is cuda and onnxruntime has it, else CPU; tensors pass
through host memory between steps.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import KoalaError
from ..families import get_family
from ..formats.onnx import read_manifest
from ..utils.extras import require
from ..utils.files import read_json
from .pipeline import LoadedPipeline, _scheduler, _student_sampling


def ort_providers(device: str | None) -> list[str]:
    """onnxruntime providers for ``device`` (None: CUDA when onnxruntime has it, else CPU)."""
    ort = require("onnxruntime", "onnx", "running an ONNX export")
    available = ort.get_available_providers()
    want_cuda = device is None or str(device).startswith("cuda")
    if want_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device is not None and str(device).startswith("cuda"):
        raise KoalaError(
            f"device {device}: this onnxruntime has no CUDAExecutionProvider (providers: {', '.join(available)}); "
            "install onnxruntime-gpu or use --device cpu",
            option="device",
        )
    return ["CPUExecutionProvider"]


class OrtModule(torch.nn.Module):
    """A weightless module around one ONNX graph: ``config`` is the component's config.json (attribute access as
    diffusers' ``FrozenDict``), ``device`` CPU (inputs and outputs are host tensors), ``dtype`` float32."""

    def __init__(self, folder: str, providers: list[str]):
        super().__init__()
        import onnxruntime as ort
        from diffusers.configuration_utils import FrozenDict

        self.folder = folder
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch would use
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"), opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.config = FrozenDict(read_json(os.path.join(folder, "config.json")))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def run(self, **inputs) -> list[torch.Tensor]:
        feed = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
        return [torch.from_numpy(x) for x in self.session.run(self.output_names, feed)]


class _Linear:
    def __init__(self, in_features: int):
        self.in_features = in_features


class _AddEmbedding:
    """What the SDXL pipeline reads of ``unet.add_embedding`` (its input width, for a micro-conditioning check)."""

    def __init__(self, in_features: int):
        self.linear_1 = _Linear(in_features)


class OrtUNet(OrtModule):
    def __init__(self, folder: str, providers: list[str]):
        super().__init__(folder, providers)
        if self.config.get("addition_embed_type") == "text_time":
            self.add_embedding = _AddEmbedding(self.config["projection_class_embeddings_input_dim"])
        # the graph's up blocks concatenate skips of the sizes the downsampling made: latents must divide evenly
        self.multiple = 2 ** (len(self.config["block_out_channels"]) - 1)

    def forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, return_dict=True, **kw):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        batch = sample.shape[0]
        if any(n % self.multiple for n in sample.shape[-2:]):
            raise KoalaError(
                f"latents {tuple(sample.shape[-2:])}: the ONNX U-Net takes latent sizes that are multiples of "
                f"{self.multiple} (its downsamplings); give a width and height that are multiples of "
                f"{self.multiple} x the VAE's factor",
                option="width",
            )
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
        feed = {"sample": sample.float(), "timestep": t, "encoder_hidden_states": encoder_hidden_states.float()}
        if "text_embeds" in self.input_names:
            feed |= {k: added_cond_kwargs[k].float() for k in ("text_embeds", "time_ids")}
        (out,) = self.run(**feed)
        out = out.to(sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class OrtVAEDecoder(OrtModule):
    """The VAE as the pipelines use it after sampling: ``decode`` only."""

    def decode(self, z, return_dict=True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        (image,) = self.run(latent_sample=z.float())
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, z):
        return self.decode(z, return_dict=False)[0]


class OrtTextEncoder(OrtModule):
    """A CLIP text tower: ``text_encoder(ids, output_hidden_states=True)`` gives transformers' output type."""

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=True, **kw):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        outs = dict(zip(self.output_names, self.run(input_ids=input_ids.long())))
        hidden = tuple(outs[n] for n in self.output_names if n.startswith("hidden_states."))
        hidden = hidden if output_hidden_states else None
        if "text_embeds" in outs:
            return CLIPTextModelOutput(
                text_embeds=outs["text_embeds"], last_hidden_state=outs["last_hidden_state"], hidden_states=hidden
            )
        return BaseModelOutputWithPooling(
            last_hidden_state=outs["last_hidden_state"], pooler_output=outs["pooler_output"], hidden_states=hidden
        )


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _scheduler_from(folder: str):
    import diffusers

    name = read_json(os.path.join(folder, "scheduler_config.json")).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise KoalaError(f"{folder}/scheduler_config.json: unknown scheduler class {name!r}", option="onnx")
    return cls.from_pretrained(folder)


def onnx_pipeline(folder: str, device: str | None = None):
    """``(pipeline, family, providers)``: the family's diffusers pipeline over the export in ``folder``."""
    import diffusers

    manifest = read_manifest(folder)
    fam = get_family(manifest["family"])
    providers = ort_providers(device)
    parts = {
        "unet": OrtUNet(os.path.join(folder, "unet"), providers),
        "vae": OrtVAEDecoder(os.path.join(folder, "vae_decoder"), providers),
        "scheduler": _scheduler_from(os.path.join(folder, "scheduler")),
    }
    for tok, enc, _ in fam.text_encoders:
        parts[enc] = OrtTextEncoder(os.path.join(folder, enc), providers)
        parts[tok] = _tokenizer(os.path.join(folder, tok))
    if fam.name == "sd":
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    config = {k: v for k, v in manifest.get("pipeline_config", {}).items() if k != "requires_safety_checker"}
    cls = getattr(diffusers, manifest.get("pipeline_class") or fam.pipeline_class_name)
    return cls(**parts, **config), fam, providers


def load_onnx_pipeline(
    folder: str, *, device: str | None = None, scheduler: str | None = None, timestep_spacing: str | None = None
) -> LoadedPipeline:
    """A :class:`LoadedPipeline` over an ONNX export, for :func:`koala.inference.generate`: the student's recorded
    sampling (its layer map, copied by the export) unless ``scheduler`` / ``timestep_spacing`` say otherwise."""
    pipe, fam, providers = onnx_pipeline(folder, device)
    _, sampling = _student_sampling(os.path.join(folder, "unet"))
    notes: list[str] = []
    label, spacing, sampling = _scheduler(pipe, sampling, scheduler, timestep_spacing, notes)
    name = f"{os.path.basename(os.path.normpath(folder))} (onnx)"
    dev = "onnxruntime:" + ("cuda" if providers[0].startswith("CUDA") else "cpu")
    modes = [f"onnxruntime {providers[0]}"]
    return LoadedPipeline(pipe, name, dev, "fp32", label, spacing, modes, notes, fam.name, "", sampling)
