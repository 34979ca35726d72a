"""Tiny pipelines with SDXL's (or SD-1.x's) topology, for tests, benchmarks and the shapes world.

One builder, parameterised by a frozen :class:`TinySpec`:

- ``family="sdxl"``: ``StableDiffusionXLPipeline`` with SDXL-Base's structure: two CLIP text encoders
  (``CLIPTextModel`` + ``CLIPTextModelWithProjection``, penultimate hidden states concatenated, pooled
  embedding from the second), ``text_time`` conditioning, down blocks [DownBlock2D, CrossAttnDownBlock2D x2],
  a cross-attention mid block and transformer depths like SDXL's [0, 2, 10], so KOALA's 10 -> 6/5 layer
  removal and mid-block removal apply verbatim.
- ``family="sd"``: ``StableDiffusionPipeline`` with SD-1.x's structure: one ``CLIPTextModel``, four stages
  [CrossAttnDownBlock2D x3, DownBlock2D], transformer depth 1, no added conditioning, no safety checker.
- ``family="pixart"``: ``PixArtSigmaPipeline`` with PixArt-Σ's structure: a T5 encoder (gated-GELU, relative
  attention) with a SentencePiece-format tokenizer, a ``PixArtTransformer2DModel`` (adaLN-single, patch 2,
  learned sigma: 8 output channels, ``dit_layers`` blocks) and PixArt-Σ's DPM-Solver scheduler config.

``RANDOM`` is the random-weight test model; ``SHAPES`` is the shapes world's teacher architecture (the packaged
teacher in ``koala/assets/shapes-teacher`` was built with it); ``SHAPES_DIT`` its PixArt-topology counterpart. The
tokenizer knows every word in ``words`` as
one token (see :mod:`koala.testing.tokenizer`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from typing import Iterable

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..errors import KoalaError
from .tokenizer import build_clip_tokenizer, build_t5_tokenizer

FAMILIES = ("sdxl", "sd", "pixart")


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny pipeline. U-Net fields (``channels``, ``depth``, ``heads``) are per SDXL stage; the SD
    family repeats the last stage once more (SD-1.x has four)."""

    text_dim: int  # each CLIP encoder's hidden size (SDXL's U-Net sees 2 * text_dim, SD's text_dim)
    projection_dim: int  # pooled embedding of the second (projection) encoder
    intermediate_size: int  # CLIP MLP width
    max_tokens: int  # tokenizer model_max_length = max_position_embeddings
    channels: tuple[int, ...]  # U-Net block_out_channels
    depth: tuple[int, ...]  # U-Net transformer_layers_per_block (SDXL family)
    vae_channels: tuple[int, ...]  # AutoencoderKL block_out_channels; downsampling factor 2 ** (len - 1)
    vae_scaling_factor: float
    heads: tuple[int, ...] = (1, 2, 2)  # diffusers' attention_head_dim (the number of heads)
    layers_per_block: int = 2
    time_embed_dim: int = 8  # addition_time_embed_dim (SDXL family)
    text_layers: int = 2
    text_heads: int = 2
    norm_groups: int = 8
    image_size: int = 32  # pixels; the U-Net's sample_size is image_size / the VAE factor
    reseed_text_encoder_2: bool = False  # seed the second encoder with seed + 1 (else it follows the first)
    dit_layers: int = 6  # PixArt family: transformer blocks (hidden size dit_heads * dit_head_dim)
    dit_heads: int = 2
    dit_head_dim: int = 8
    text_dim_2: int | None = None  # SDXL's second (projection) encoder's hidden size when it differs from text_dim

    @property
    def text_dim_sdxl(self) -> int:
        """The SDXL U-Net's cross-attention width: both encoders' hidden sizes."""
        return self.text_dim + (self.text_dim_2 or self.text_dim)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


RANDOM = TinySpec(
    text_dim=16,
    projection_dim=16,
    intermediate_size=32,
    max_tokens=77,
    channels=(16, 32, 32),
    depth=(1, 2, 10),
    vae_channels=(8, 16),
    vae_scaling_factor=0.13025,
)
SHAPES = TinySpec(
    text_dim=32,
    projection_dim=32,
    intermediate_size=64,
    max_tokens=32,
    channels=(32, 64, 64),
    depth=(1, 2, 10),
    vae_channels=(32, 64),
    vae_scaling_factor=1.0,
    reseed_text_encoder_2=True,
)
# the shapes world's DiT teacher (PixArt topology): the same text width and VAE, 12 blocks of width 64
SHAPES_DIT = dataclasses.replace(SHAPES, dit_layers=12, dit_heads=4, dit_head_dim=16)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise KoalaError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}", option="family")


def unet_config(spec: TinySpec = RANDOM, family: str = "sdxl") -> dict:
    """``UNet2DConditionModel`` config of the spec's U-Net."""
    _check_family(family)
    common = {
        "sample_size": spec.latent_size,
        "in_channels": 4,
        "out_channels": 4,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": spec.layers_per_block,
        "norm_num_groups": spec.norm_groups,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if family == "sd":
        return {
            **common,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [*spec.channels, spec.channels[-1]],
            "transformer_layers_per_block": 1,
            "attention_head_dim": [*spec.heads, spec.heads[-1]],
            "cross_attention_dim": spec.text_dim,
            "use_linear_projection": False,
        }
    return {
        **common,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": list(spec.channels),
        "transformer_layers_per_block": list(spec.depth),
        "attention_head_dim": list(spec.heads),
        "cross_attention_dim": spec.text_dim_sdxl,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": spec.time_embed_dim,
        "projection_class_embeddings_input_dim": spec.projection_dim + 6 * spec.time_embed_dim,
    }


def dit_config(spec: TinySpec = RANDOM) -> dict:
    """``PixArtTransformer2DModel`` config of the spec's DiT (PixArt-Σ's structure, tiny sizes)."""
    return {
        "num_attention_heads": spec.dit_heads,
        "attention_head_dim": spec.dit_head_dim,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": spec.dit_layers,
        "cross_attention_dim": spec.dit_heads * spec.dit_head_dim,
        "attention_bias": True,
        "sample_size": spec.latent_size,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "use_additional_conditions": False,
        "caption_channels": spec.text_dim,
    }


def denoiser_config(spec: TinySpec = RANDOM, family: str = "sdxl") -> dict:
    """The family's denoiser config for the spec: a U-Net's (sdxl, sd) or a DiT's (pixart)."""
    _check_family(family)
    return dit_config(spec) if family == "pixart" else unet_config(spec, family)


def tiny_dit(spec: TinySpec = RANDOM, seed: int = 0, **overrides) -> PixArtTransformer2DModel:
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**dit_config(spec))


def tiny_t5(spec: TinySpec = RANDOM, vocab_size: int = 1000, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=spec.text_dim,
            d_kv=spec.text_dim // spec.text_heads,
            d_ff=spec.intermediate_size,
            num_layers=spec.text_layers,
            num_heads=spec.text_heads,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def pixart_scheduler() -> DPMSolverMultistepScheduler:
    """PixArt-Σ's scheduler config (DPM-Solver++, linear betas 0.0001..0.02, 1000 steps, epsilon)."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        solver_order=2,
        algorithm_type="dpmsolver++",
        timestep_spacing="linspace",
        steps_offset=0,
    )


def tiny_unet(spec: TinySpec = RANDOM, seed: int = 0, family: str = "sdxl", **overrides) -> UNet2DConditionModel:
    """A random U-Net; ``overrides`` replace spec fields (``tiny_unet(seed=1, channels=(16, 32, 48))``)."""
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    cfg = unet_config(spec, family)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg)


def tiny_vae(spec: TinySpec = RANDOM, seed: int = 0) -> AutoencoderKL:
    n = len(spec.vae_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(spec.vae_channels),
        layers_per_block=1,
        norm_num_groups=spec.norm_groups,
        sample_size=spec.image_size,
        scaling_factor=spec.vae_scaling_factor,
        force_upcast=False,
    )


def text_encoder_config(spec: TinySpec, vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_dim,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_tokens,
        projection_dim=spec.projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def tiny_text_encoders(spec: TinySpec = RANDOM, vocab_size: int = 1000, seed: int = 0, family: str = "sdxl") -> tuple:
    """``(CLIPTextModel, CLIPTextModelWithProjection)`` for SDXL, ``(CLIPTextModel,)`` for SD, ``(T5EncoderModel,)``
    for PixArt."""
    _check_family(family)
    if family == "pixart":
        return (tiny_t5(spec, vocab_size, seed),)
    cfg = text_encoder_config(spec, vocab_size)
    torch.manual_seed(seed)
    te1 = CLIPTextModel(cfg)
    if family == "sd":
        return (te1,)
    if spec.reseed_text_encoder_2:
        torch.manual_seed(seed + 1)
    if spec.text_dim_2:
        cfg = text_encoder_config(dataclasses.replace(spec, text_dim=spec.text_dim_2), vocab_size)
    return te1, CLIPTextModelWithProjection(cfg)


def tiny_tokenizer(spec: TinySpec = RANDOM, words: Iterable[str] = ()):
    with tempfile.TemporaryDirectory() as d:
        return build_clip_tokenizer(d, words, model_max_length=spec.max_tokens)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL-Base's scheduler config (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def sd_scheduler() -> PNDMScheduler:
    """SD-1.5's scheduler config (PNDM, same scaled-linear betas, 1000 steps, epsilon)."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_pipeline(spec: TinySpec = RANDOM, seed: int = 0, words: Iterable[str] = (), family: str = "sdxl"):
    """A complete tiny pipeline with random weights (CPU, fp32)."""
    _check_family(family)
    if family == "pixart":
        with tempfile.TemporaryDirectory() as d:
            t5_tok = build_t5_tokenizer(d, words)
        return PixArtSigmaPipeline(
            tokenizer=t5_tok,
            text_encoder=tiny_t5(spec, len(t5_tok), seed),
            vae=tiny_vae(spec, seed),
            transformer=tiny_dit(spec, seed),
            scheduler=pixart_scheduler(),
        )
    tok = tiny_tokenizer(spec, words)
    encoders = tiny_text_encoders(spec, len(tok), seed, family)
    vae, unet = tiny_vae(spec, seed), tiny_unet(spec, seed, family)
    if family == "sd":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tok,
            unet=unet,
            scheduler=sd_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_pipeline(
    out_dir: str, spec: TinySpec = RANDOM, seed: int = 0, words: Iterable[str] = (), family: str = "sdxl"
) -> str:
    """Write :func:`tiny_pipeline` to ``out_dir`` (safetensors); ``from_pretrained(out_dir)`` loads it."""
    tiny_pipeline(spec, seed, words, family).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# the tiny VLM's word-level vocabulary (``save_tiny_vlm`` adds the caller's words)
VLM_VOCAB = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<image>",
    "USER:",
    "ASSISTANT:",
    "describe",
    "this",
    "image",
    "in",
    "detail.",
    "a",
    "red",
    "blue",
    "circle",
    "square",
    ".",
    ",",
)


def save_tiny_vlm(out_dir: str, words: Iterable[str] = (), seed: int = 0) -> str:
    """A random tiny LLaVA (CLIP vision tower + Llama text model) with its processor, for ``koala data syncap`` tests:
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` load it from ``out_dir``."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    vocab = list(VLM_VOCAB)
    vocab += [w for w in words if w not in vocab]
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(_tiny_vlm_config(vocab)).save_pretrained(out_dir)
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=_word_tokenizer(vocab),
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    ).save_pretrained(out_dir)
    return out_dir


def _word_tokenizer(vocab: list[str]):
    """A whitespace-split word-level fast tokenizer over ``vocab`` (LLaVA's special tokens included)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )


def _tiny_vlm_config(vocab: list[str]):
    """LLaVA config: a 2-layer CLIP vision tower (32 px images, 8 px patches) and a 2-layer Llama over ``vocab``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
        image_token_index=vocab.index("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
