"""The family seam: everything koala needs to know about one kind of text-to-image model.

A :class:`Family` owns, for its models: the topology check of a teacher, the presets and the student config
they produce, compression (the teacher->student layer map, saved as ``koala_layer_map.json``), the stage
names and where each stage's last feature is, conditioning (prompt encoding and added conditions, used
identically by training, caching and inference), the component loader and the diffusers pipeline class.
Trainer, hooks, losses, compress, cache, generate and bench ask the family and know nothing of SDXL.

:class:`UNetFamily` implements the parts shared by ``UNet2DConditionModel`` families (SDXL, SD-1.x/2.x).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..arch.compress import init_from_teacher
from ..arch.layer_map import LayerMap
from ..arch.unet import (
    UNetSpec,
    build_unet_layer_map,
    unet_stage_modules,
    unet_student_config,
    unet_teacher_spec,
    unet_topology_problems,
    unet_transformer_pairs,
)
from ..errors import KoalaError
from ..utils.devices import parse_dtype, tree_to
from ..utils.files import read_json
from ..utils.weights import check_weights


@dataclass
class Parts:
    """The frozen parts of a pipeline around the denoiser: tokenizers, text encoders, VAE, scheduler.
    ``pipeline_class_name``: the diffusers pipeline they came from (a family may have several, e.g. PixArt-α/Σ)."""

    family: "Family"
    tokenizers: list
    text_encoders: list
    vae: Any
    scheduler: Any
    pipeline_class_name: str = ""

    def to(self, device) -> "Parts":
        for m in (*self.text_encoders, self.vae):
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device


REGISTRY: dict[str, "Family"] = {}  # name -> family instance; filled by koala.families


def model_subfolders() -> tuple[str, ...]:
    """Every family's denoiser folder name in a pipeline or checkpoint directory (unet, transformer), in registry
    order."""
    return tuple(dict.fromkeys(f.model_subfolder for f in REGISTRY.values()))


def find_model_folder(path: str, suffix: str = "") -> str | None:
    """The denoiser folder of a pipeline or checkpoint directory: the first ``path/<subfolder><suffix>`` (suffix
    ``_ema``: a checkpoint's EMA twin) that holds a model config; None when there is none."""
    return next(
        (
            os.path.join(path, sub + suffix)
            for sub in model_subfolders()
            if os.path.isfile(os.path.join(path, sub + suffix, "config.json"))
        ),
        None,
    )


def family_of_preset(preset: str) -> "Family | None":
    return next((f for f in REGISTRY.values() if preset in f.presets), None)


def describe_config(config: dict) -> str:
    """' (it looks like a FAMILY model ...)' when another family accepts ``config``; '' otherwise."""
    other = next((f for f in REGISTRY.values() if not f.problems(config)), None)
    return f" (it looks like a {other.label} model: family {other.name!r})" if other else ""


def _freeze(m: torch.nn.Module) -> torch.nn.Module:
    return m.requires_grad_(False).eval()


class Family:
    """Interface and what every family shares (conditioning plumbing, component loading, compression through the
    layer map); :class:`UNetFamily` implements the U-Net parts, :class:`~koala.families.pixart.PixArtFamily` the
    DiT ones."""

    name: str = ""
    label: str = ""
    pipeline_class_name: str = ""
    pipeline_class_names: tuple[str, ...] = ()  # every pipeline class of the family (default: pipeline_class_name)
    model_subfolder: str = "unet"
    model_class_name: str = "UNet2DConditionModel"
    sample_arg: str = "sample"  # the denoiser forward's name for the noisy latents
    spec_class: type = UNetSpec  # what a preset / custom student spec is
    # (tokenizer subfolder, text encoder subfolder, transformers class name) per text encoder, in order
    text_encoders: tuple[tuple[str, str, str], ...] = ()
    tokenizer_class_name: str = "CLIPTokenizer"
    pipeline_call_kwargs: dict[str, Any] = {}  # what koala generate passes to every pipeline call
    empty_negative_prompt: Any = None  # negative_prompt when the user gives none (PixArt's pipelines need "")
    text_cond_keys: tuple[str, ...] = ()  # text conditioning tensors (what caption dropout replaces)
    micro_cond_keys: tuple[str, ...] = ()  # added conditions computed from a batch's size/crop bookkeeping
    reference_config: dict[str, Any] = {}  # the full-size teacher's denoiser config (presets are derived from it)
    presets: dict[str, Any] = {}  # name -> spec (spec_class)
    real_text_towers: tuple[dict, ...] = ()  # config kwargs of the full-size text encoders (benchmarks)
    text_config_class_name: str = "CLIPTextConfig"  # the transformers config class of real_text_towers
    default_text_len: int = 77  # tokens per prompt (the tokenizer's padded length) for dummy inputs
    pipeline_load_kwargs: dict[str, Any] = {}  # extra from_pretrained kwargs for the family's pipeline
    vae_upcast: bool = False  # the pipeline decodes an fp16 VAE in fp32 when vae.config.force_upcast is set
    # the original single-file layout of the family's checkpoints (koala.formats): "sgm" (Stability's
    # generative-models, SDXL), "ldm" (CompVis latent-diffusion, SD-1.x); None: koala reads and writes none
    single_file_layout: str | None = None
    lora_transfer: bool = False  # koala lora transfer maps the family's LoRAs onto its students
    # koala adapter transfer maps the family's IP-Adapters onto its students (its diffusers pipeline has
    # load_ip_adapter and its denoiser IP-Adapter attention processors); False: refused, this says why
    ip_adapter_transfer: bool = False
    ip_adapter_missing: str = "its diffusers pipeline has no IP-Adapter loader (load_ip_adapter)"
    t2i_adapter_pipeline: str | None = None  # the diffusers pipeline that runs a T2I-Adapter; None: none does
    # diffusers' ControlNet pipeline of the family ("": none, and koala controlnet transfer refuses the family)
    controlnet_pipeline_class_name: str = ""
    reference_name: str = ""  # the model reference_config describes (messages)
    # the hub repository of that model: tokenizers of a single-file conversion are looked up in the local Hugging
    # Face cache under it (never downloaded); None: not looked up
    reference_hub_id: str | None = None
    # that model's VAE and scheduler configs; with reference_config and real_text_towers, what a single file is
    # converted with when no config directory is given ({}: koala ships none)
    reference_vae_config: dict[str, Any] = {}
    reference_scheduler_config: dict[str, Any] = {}

    # ------------------------------------------------------------------ identity
    def __repr__(self) -> str:
        return f"<family {self.name}: {self.label}>"

    @property
    def cond_keys(self) -> tuple[str, ...]:
        """All conditioning tensors of a batch (what the cache stores besides latents)."""
        return self.text_cond_keys + self.micro_cond_keys

    @property
    def components(self) -> tuple[str, ...]:
        """Pipeline subfolders the conditioning depends on (the cache fingerprints these)."""
        return ("vae", *[e for _, e, _ in self.text_encoders], *[t for t, _, _ in self.text_encoders])

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def pipeline_class_of(self, pipeline_dir: str):
        """The diffusers pipeline class a pipeline directory of this family names (model_index.json), when it is
        one of the family's; else the family's default."""
        import diffusers

        name = (
            read_json(os.path.join(pipeline_dir, "model_index.json")).get("_class_name")
            if os.path.isfile(os.path.join(pipeline_dir, "model_index.json"))
            else None
        )
        return getattr(
            diffusers,
            name if name in (self.pipeline_class_names or (self.pipeline_class_name,)) else self.pipeline_class_name,
        )

    def problems(self, config: dict) -> list[str]:
        raise NotImplementedError

    def check(self, config: dict, where: str = "model config") -> None:
        problems = self.problems(config)
        if problems:
            raise KoalaError(f"{where} is not a {self.label} model: " + "; ".join(problems) + describe_config(config))

    # ------------------------------------------------------------------ presets
    def resolve_spec(self, preset):
        """A preset name, a spec of :attr:`spec_class`, or its dict or JSON text (a custom student) -> a spec."""
        if isinstance(preset, self.spec_class):
            return preset
        if isinstance(preset, str) and preset.lstrip().startswith("{"):  # a custom spec written as JSON
            try:
                preset = json.loads(preset)
            except json.JSONDecodeError as err:
                raise KoalaError(f"student spec {preset!r} is not valid JSON ({err})") from err
        if isinstance(preset, dict):
            return self.spec_class.from_dict(preset)
        if preset not in self.presets:
            other = family_of_preset(preset)
            why = (
                f"preset {preset!r} belongs to the {other.label} family ({other.name})"
                if other
                else f"unknown preset {preset!r}"
            )
            raise KoalaError(
                f"{why}; for this {self.label} teacher choose one of: {', '.join(self.presets)} "
                "(or give a custom spec)"
            )
        return copy.deepcopy(self.presets[preset])

    def spec_summary(self, spec) -> dict[str, Any]:
        """Columns of the presets table that describe a spec's structure."""
        return spec.to_dict()

    def student_config(self, teacher_config: dict, spec) -> dict:
        raise NotImplementedError

    @property
    def model_class(self):
        """The diffusers class of the family's denoiser (:attr:`model_class_name`)."""
        import diffusers

        return getattr(diffusers, self.model_class_name)

    def build_model(self, config: dict, device: str | torch.device = "meta"):
        """The denoiser for ``config`` with freshly initialised weights; on ``meta`` this costs no memory and no
        init time."""
        with torch.device(device):
            return self.model_class.from_config(config)

    def load_model(self, path: str, dtype=None):
        check_weights(path)
        return self.model_class.from_pretrained(path, dtype=parse_dtype(dtype) or torch.float32)

    def build_layer_map(self, teacher, student, selection: str = "bottom") -> LayerMap:
        raise NotImplementedError

    def compress(self, teacher, spec, layer_selection: str = "bottom", dtype=None):
        """``(student, layer_map)``: a student for ``spec`` whose every tensor is a copy of the mapped teacher
        tensor."""
        spec = self.resolve_spec(spec)
        student = self.build_model(self.student_config(dict(teacher.config), spec), "meta")
        lmap = self.build_layer_map(teacher, student, layer_selection)
        lmap.family = self.name
        lmap.meta["spec"] = spec.to_dict()
        init_from_teacher(teacher, student, lmap, parse_dtype(dtype))
        return student, lmap

    # ------------------------------------------------------------------ KD sites
    def stage_modules(self, lmap: LayerMap, student, teacher) -> dict[str, tuple[str, str]]:
        """Stage -> (student module, teacher module) whose output is the stage's last feature (LF)."""
        raise NotImplementedError

    def transformer_pairs(self, lmap: LayerMap, student, teacher, selection: str | None) -> list[tuple[str, str, str]]:
        """(stage, student transformer layer, teacher transformer layer) for every student transformer layer:
        the layer map's pairs (``selection`` None) or the teacher layers ``selection`` picks (featKD only)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the denoiser's forward
    def model_inputs(self, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments of the denoiser's forward besides the sample and ``timestep``."""
        raise NotImplementedError

    def forward(
        self,
        model,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: dict[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        extra: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The denoiser's raw output for conditioning ``cond`` (the family's cond keys); inputs cast to ``dtype``
        when given (a frozen fp16 teacher). ``extra``: more keyword arguments of the call, passed as they are (a
        ControlNet's ``down_block_additional_residuals`` / ``mid_block_additional_residual``)."""
        kw = self.model_inputs(cond)
        if dtype is not None:
            sample, kw = sample.to(dtype), tree_to(kw, dtype=dtype)
        return model(**{self.sample_arg: sample}, timestep=timestep, **kw, **(extra or {}), return_dict=False)[0]

    def prediction(self, output: torch.Tensor, latent_channels: int) -> torch.Tensor:
        """The part of a raw output that is the prediction the sampler uses (and the task loss trains): all of it,
        except for learned-sigma models (PixArt), whose second half of the channels is the variance."""
        return output[:, :latent_channels] if output.shape[1] == 2 * latent_channels else output

    # ------------------------------------------------------------------ conditioning
    zero_uncond: bool = False  # True: the unconditional input is all zeros; False: the empty prompt's encoding

    def tokenize(self, prompts: Sequence[str], tokenizers) -> list[torch.Tensor]:
        """Token ids per text encoder, padded to each tokenizer's ``model_max_length`` as the pipeline does."""
        return [
            tok(
                list(prompts),
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tok in tokenizers
        ]

    def token_batch(self, ids: torch.Tensor):
        """What :meth:`tokenize` gives per encoder for token ids ``ids`` (benchmarks feed random ids): the ids
        themselves; T5 families also carry an attention mask."""
        return ids

    def encode_tokens(self, ids: Sequence[torch.Tensor], text_encoders) -> dict[str, torch.Tensor]:
        """Text conditioning from token ids (one tensor per encoder); gradients: the caller decides."""
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str], tokenizers, text_encoders) -> dict[str, torch.Tensor]:
        """Text conditioning exactly as the family's pipeline computes it (gradients: the caller decides)."""
        return self.encode_tokens(self.tokenize(prompts, tokenizers), text_encoders)

    def micro_conditions(self, batch: dict) -> dict[str, torch.Tensor]:
        """Added conditions from a raw batch's bookkeeping (SDXL's size/crop time ids); {} when none."""
        return {}

    def uncond(self, parts: Parts) -> dict[str, torch.Tensor]:
        """The unconditional text conditioning (batch of one) as the pipeline feeds it for an empty prompt: all
        zeros (``zero_uncond``, SDXL's force_zeros_for_empty_prompt) or the empty prompt's encoding (SD-1.x)."""
        with torch.no_grad():
            out = self.encode_prompts([""], parts.tokenizers, parts.text_encoders)
        return {k: torch.zeros_like(v) if self.zero_uncond else v for k, v in out.items()}

    def drop_captions(
        self, cond: dict[str, torch.Tensor], drop: torch.Tensor, uncond: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Caption dropout: ``cond`` with the text conditioning (``text_cond_keys``) of the samples where ``drop``
        (bool, one per sample) is True replaced by ``uncond`` (:meth:`uncond`'s batch of one, cast to each tensor's
        device and dtype); the other keys as they are. Gradients flow as through ``torch.where``."""
        out = dict(cond)
        for k in self.text_cond_keys:
            v = cond[k]
            out[k] = torch.where(drop.view(-1, *[1] * (v.ndim - 1)), uncond[k].to(v.device, v.dtype), v)
        return out

    def dummy_cond(
        self, config: dict, batch: int = 1, text_len: int | None = None, device="meta", dtype=torch.float32
    ) -> dict[str, torch.Tensor]:
        """Random conditioning tensors (``cond_keys``) shaped for a denoiser with ``config`` (what a cached batch
        holds besides latents); on ``meta`` by default."""
        raise NotImplementedError

    def dummy_inputs(
        self,
        config: dict,
        latent_size: int,
        batch: int = 1,
        text_len: int | None = None,
        device="meta",
        dtype=torch.float32,
    ) -> dict[str, Any]:
        """A full forward's inputs (random or meta) for FLOP counting and benchmarks."""
        with torch.device(device):
            sample = torch.randn(batch, config["in_channels"], latent_size, latent_size, dtype=dtype)
            timestep = torch.full((batch,), 500, dtype=torch.long)
        return {
            self.sample_arg: sample,
            "timestep": timestep,
            **self.model_inputs(self.dummy_cond(config, batch, text_len or self.default_text_len, device, dtype)),
        }

    # ------------------------------------------------------------------ components and pipelines
    def check_pipeline_dir(self, path: str, what: str = "pipeline") -> None:
        """Every component folder is there and its safetensors files are whole (headers only: fast)."""
        for sub in (self.model_subfolder, *self.components, "scheduler"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise KoalaError(
                    f"{what} {path} has no {sub}/; a {self.label} pipeline needs "
                    f"{', '.join((self.model_subfolder, *self.components, 'scheduler'))}"
                )
        for sub in (self.model_subfolder, *self.components):
            check_weights(os.path.join(path, sub))

    def load_parts(self, pipeline_dir: str, dtype=None, vae_dtype=None, device="cpu") -> Parts:
        """Tokenizers, text encoders (frozen, ``dtype``), VAE (frozen; fp32 when its config says force_upcast and
        no ``vae_dtype`` is given) and scheduler of a local pipeline directory. The one loader koala uses."""
        import diffusers
        import transformers

        self.check_pipeline_dir(pipeline_dir)
        dt = parse_dtype(dtype) or torch.float32
        toks, encs = [], []
        for tok_dir, enc_dir, cls in self.text_encoders:
            toks.append(
                getattr(transformers, self.tokenizer_class_name).from_pretrained(pipeline_dir, subfolder=tok_dir)
            )
            encs.append(_freeze(getattr(transformers, cls).from_pretrained(pipeline_dir, subfolder=enc_dir, dtype=dt)))
        upcast = read_json(os.path.join(pipeline_dir, "vae", "config.json")).get("force_upcast", False)
        vdt = parse_dtype(vae_dtype) or (torch.float32 if upcast else dt)
        vae = _freeze(diffusers.AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae", dtype=vdt))
        sched_cfg = read_json(os.path.join(pipeline_dir, "scheduler", "scheduler_config.json"))
        scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
        return Parts(self, toks, encs, vae, scheduler, self.pipeline_class_of(pipeline_dir).__name__).to(device)

    def make_pipeline(self, parts: Parts, model, scheduler=None):
        """A diffusers pipeline from loaded parts and a denoiser (shares the modules; copies nothing)."""
        raise NotImplementedError

    def reference_pipeline_configs(self) -> dict[str, dict]:
        """Component -> config of the full-size reference pipeline (denoiser, VAE, text encoders, scheduler) from
        the configs koala ships; {} when the family ships no VAE and scheduler configs."""
        if not (self.reference_vae_config and self.reference_scheduler_config):
            return {}
        encoders = {
            enc: {"architectures": [cls], **tower}
            for (_, enc, cls), tower in zip(self.text_encoders, self.real_text_towers)
        }
        return {
            self.model_subfolder: dict(self.reference_config),
            "vae": {"_class_name": "AutoencoderKL", **self.reference_vae_config},
            **encoders,
            "scheduler": dict(self.reference_scheduler_config),
        }


class UNetFamily(Family):
    """A family of ``UNet2DConditionModel`` denoisers."""

    def problems(self, config: dict) -> list[str]:
        return unet_topology_problems(config)

    def teacher_spec(self, config: dict) -> UNetSpec:
        self.check(config)
        return unet_teacher_spec(config)

    def student_config(self, teacher_config: dict, spec: str | UNetSpec | dict) -> dict:
        self.check(teacher_config, "teacher config")
        return unet_student_config(teacher_config, self.resolve_spec(spec))

    def spec_summary(self, spec: UNetSpec) -> dict[str, Any]:
        return {
            "encoder_layers": spec.encoder_layers,
            "transformer_depth": spec.down_depth,
            "decoder_transformer_depth": spec.up_depth,
            "mid_block": spec.mid_block,
            "stages": spec.stages or len(spec.encoder_layers),
        }

    def build_layer_map(self, teacher, student, selection: str = "bottom") -> LayerMap:
        return build_unet_layer_map(teacher, student, selection)

    def stage_modules(self, lmap: LayerMap, student, teacher) -> dict[str, tuple[str, str]]:
        return unet_stage_modules(lmap, student, teacher)

    def transformer_pairs(self, lmap: LayerMap, student, teacher, selection: str | None) -> list[tuple[str, str, str]]:
        return unet_transformer_pairs(lmap, student, teacher, selection)
