"""PixArt family: PixArt-Σ / PixArt-α diffusion transformers (DiT-XL/2) and their DiT-M students (paper Sec. 4.3,
Table 8, App. A.4).

Conditioning exactly as ``PixArtSigmaPipeline.encode_prompt`` computes it with ``clean_caption=False``: the prompt
is lower-cased and stripped, tokenized by the T5 tokenizer to ``max_sequence_length`` tokens (Σ: 300, α: 120;
padding "max_length", truncation), and encoded by the T5 encoder *with* the attention mask; the mask travels
with the embeddings to the transformer's cross-attention (``encoder_attention_mask``). The unconditional input is
the encoding of the empty prompt (with its mask). PixArt-α at 1024² (``sample_size`` 128) also takes
``resolution`` (h, w) and ``aspect_ratio`` (h / w) micro-conditions; koala always computes them (from a batch's
original size and target size, as PixArt-α's multi-scale training does) and the transformer ignores them when
``use_additional_conditions`` is off (Σ, α-512).

The transformer predicts 8 channels ("learned sigma"): the first 4 are epsilon, the last 4 the variance
interpolation. :meth:`Family.prediction` keeps the epsilon half for the task loss and for sampling, as the
pipelines do; see docs/architecture.md for what L_outKD does with the variance half.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..arch.dit import (
    DiTSpec,
    build_dit_layer_map,
    dit_stage_modules,
    dit_student_config,
    dit_topology_problems,
    dit_transformer_pairs,
)
from ..arch.layer_map import LayerMap
from .base import Family, Parts

# The PixArt-Sigma-XL-2-512-MS transformer config (public fact: PixArt-alpha/PixArt-Sigma-XL-2-512-MS
# transformer/config.json; the paper's teacher, App. A.4).
PIXART_SIGMA_512_CONFIG: dict[str, Any] = {
    "_class_name": "PixArtTransformer2DModel",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 4,
    "interpolation_scale": None,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 64,
    "upcast_attention": False,
    "use_additional_conditions": False,
}

PRESETS: dict[str, DiTSpec] = {
    "pixart-sigma-xl": DiTSpec(28, "PixArt-Σ DiT-XL/2 (teacher)", 611_000_000),
    "dit-m": DiTSpec(14, "DiT-M: the bottom 14 of DiT-XL's 28 blocks (App. A.4)", 313_000_000),
}

MAX_SEQUENCE_LENGTH = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}  # the pipelines' defaults

# T5 v1.1 XXL encoder (google/t5-v1_1-xxl, PixArt's text encoder): what `koala bench` builds at real size
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
)


class PixArtFamily(Family):
    name = "pixart"
    label = "PixArt DiT"
    pipeline_class_name = "PixArtSigmaPipeline"
    pipeline_class_names = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    model_subfolder = "transformer"
    model_class_name = "PixArtTransformer2DModel"
    sample_arg = "hidden_states"
    spec_class = DiTSpec
    text_encoders = (("tokenizer", "text_encoder", "T5EncoderModel"),)
    tokenizer_class_name = "T5Tokenizer"
    text_config_class_name = "T5Config"
    text_cond_keys = ("prompt_embeds", "prompt_attention_mask")
    micro_cond_keys = ("resolution", "aspect_ratio")
    reference_config = PIXART_SIGMA_512_CONFIG
    presets = PRESETS
    real_text_towers = (T5_XXL,)
    default_text_len = 300
    # koala's prompts are encoded as the pipeline does with clean_caption=False (lower-case + strip); the size the
    # user asks for is the size generated (no silent snapping to PixArt's aspect-ratio bins)
    pipeline_call_kwargs = {"clean_caption": False, "use_resolution_binning": False}
    empty_negative_prompt = ""
    reference_name = "PixArt-Sigma-XL-2-512-MS"

    def problems(self, config: dict) -> list[str]:
        return dit_topology_problems(config)

    def teacher_spec(self, config: dict) -> DiTSpec:
        self.check(config)
        return DiTSpec(int(config["num_layers"]), "teacher")

    def student_config(self, teacher_config: dict, spec) -> dict:
        self.check(teacher_config, "teacher config")
        return dit_student_config(teacher_config, self.resolve_spec(spec))

    def spec_summary(self, spec: DiTSpec) -> dict[str, Any]:
        return {"layers": spec.num_layers}

    def build_layer_map(self, teacher, student, selection: str = "bottom") -> LayerMap:
        return build_dit_layer_map(teacher, student, selection)

    def stage_modules(self, lmap: LayerMap, student, teacher) -> dict[str, tuple[str, str]]:
        return dit_stage_modules(lmap)

    def transformer_pairs(self, lmap: LayerMap, student, teacher, selection: str | None) -> list[tuple[str, str, str]]:
        return dit_transformer_pairs(lmap, student, teacher, selection)

    # ------------------------------------------------------------------ conditioning
    def tokenize(self, prompts: Sequence[str], tokenizers) -> list:
        """``[(input_ids, attention_mask)]``: the pipeline's ``_text_preprocessing`` (clean_caption=False: lower-case,
        strip) then T5 tokenization padded to ``model_max_length`` (set to the pipeline's max_sequence_length by
        :meth:`load_parts`)."""
        tok = tokenizers[0]
        enc = tok(
            [p.lower().strip() for p in prompts],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return [(enc.input_ids, enc.attention_mask)]

    def token_batch(self, ids: torch.Tensor):
        return ids, torch.ones_like(ids)

    def encode_tokens(self, ids, text_encoders) -> dict[str, torch.Tensor]:
        (tok_ids, mask), enc = ids[0], text_encoders[0]
        dev = next(enc.parameters()).device
        mask = mask.to(dev)
        return {"prompt_embeds": enc(tok_ids.to(dev), attention_mask=mask)[0], "prompt_attention_mask": mask}

    def micro_conditions(self, batch: dict) -> dict[str, torch.Tensor]:
        orig = torch.as_tensor(batch["original_size"], dtype=torch.float32).reshape(-1, 2)
        target = torch.as_tensor(batch["target_size"], dtype=torch.float32).reshape(-1, 2)
        return {"resolution": orig, "aspect_ratio": (target[:, 0] / target[:, 1]).unsqueeze(1)}

    def model_inputs(self, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "encoder_hidden_states": cond["prompt_embeds"],
            "encoder_attention_mask": cond["prompt_attention_mask"],
            "added_cond_kwargs": {"resolution": cond.get("resolution"), "aspect_ratio": cond.get("aspect_ratio")},
        }

    def dummy_cond(
        self, config: dict, batch: int = 1, text_len: int | None = None, device="meta", dtype=torch.float32
    ) -> dict[str, torch.Tensor]:
        n = text_len or self.default_text_len
        with torch.device(device):
            return {
                "prompt_embeds": torch.randn(batch, n, config["caption_channels"], dtype=dtype),
                "prompt_attention_mask": torch.ones(batch, n, dtype=dtype),
                "resolution": torch.tensor([[1024.0, 1024.0]] * batch, dtype=dtype),
                "aspect_ratio": torch.tensor([[1.0]] * batch, dtype=dtype),
            }

    # ------------------------------------------------------------------ components and pipelines
    def load_parts(self, pipeline_dir: str, dtype=None, vae_dtype=None, device="cpu") -> Parts:
        parts = super().load_parts(pipeline_dir, dtype, vae_dtype, device)
        parts.tokenizers[0].model_max_length = MAX_SEQUENCE_LENGTH[parts.pipeline_class_name]
        return parts

    def make_pipeline(self, parts: Parts, model, scheduler=None):
        import diffusers

        cls = getattr(diffusers, parts.pipeline_class_name or self.pipeline_class_name)
        return cls(
            tokenizer=parts.tokenizers[0],
            text_encoder=parts.text_encoders[0],
            vae=parts.vae,
            transformer=model,
            scheduler=scheduler or parts.scheduler,
        )
