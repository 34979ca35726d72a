"""Training-input throughput on CPU: reading the latent/text cache vs encoding on the fly.

On the fly = decode image + SDXL transform + VAE encode + both text encoders, per batch (what a trainer
without a cache does). Cache = read safetensors shards. Random weights, generated images; the VAE is an
AutoencoderKL with 4 blocks (64-128 channels, factor 8) and the text encoders are 4-layer CLIPs (width 128),
so the ratio is a lower bound of the real SDXL one (the real VAE/encoders are far more expensive).

    nice python benchmarks/bench_data_cache.py --images 64 --resolution 256 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def build_pipeline_dir(path: str, seed: int = 0) -> str:
    """A tiny SDXL pipeline (its U-Net only tells koala the family) with a bigger VAE and text encoders."""
    import shutil

    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from koala.testing.images import WORDS
    from koala.testing.tiny import save_tiny_pipeline

    save_tiny_pipeline(path, seed=seed, words=WORDS)
    for sub in ("vae", "text_encoder", "text_encoder_2"):
        shutil.rmtree(os.path.join(path, sub))
    tok = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    torch.manual_seed(seed)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[64, 128, 128, 128],
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.13025,
    ).save_pretrained(os.path.join(path, "vae"))
    v = len(tok)
    common = dict(
        vocab_size=v,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=128,
        bos_token_id=v - 2,
        eos_token_id=v - 1,
        pad_token_id=v - 1,
    )
    CLIPTextModel(CLIPTextConfig(**common)).save_pretrained(os.path.join(path, "text_encoder"))
    CLIPTextModelWithProjection(CLIPTextConfig(**common)).save_pretrained(os.path.join(path, "text_encoder_2"))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from koala.data import build_cache, encode_batch, make_dataloader
    from koala.families import family_of
    from koala.testing.images import write_folder

    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        r = args.resolution
        write_folder(
            os.path.join(d, "img"), args.images, sizes=((r + r // 4, r + r // 2), (2 * r, r + r // 4), (r, r))
        )
        pipe = build_pipeline_dir(os.path.join(d, "pipe"))
        cfg = {"type": "folder", "path": os.path.join(d, "img")}
        n = args.images

        enc = family_of(pipe).load_parts(pipe)
        t0 = time.perf_counter()
        seen = 0
        with torch.inference_mode():
            for raw in make_dataloader({**cfg, "repeat": False}, batch_size=args.batch_size, resolution=r):
                encode_batch(raw, enc, "sample")
                seen += len(raw["captions"])
        fly = seen / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        build_cache(
            cfg,
            pipe,
            os.path.join(d, "cache"),
            resolution=r,
            batch_size=args.batch_size,
            shard_size=32,
            dtype="fp16",
            progress=False,
        )
        build_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        seen = 0
        for b in make_dataloader(
            {"type": "cache", "path": os.path.join(d, "cache"), "repeat": False},
            batch_size=args.batch_size,
            resolution=r,
            pipeline_dir=pipe,
        ):
            b = {k: v.float() if torch.is_tensor(v) else v for k, v in b.items()}  # as a trainer would cast
            seen += len(b["captions"])
        cached = seen / (time.perf_counter() - t0)
        size = sum(
            os.path.getsize(os.path.join(d, "cache", "shards", f))
            for f in os.listdir(os.path.join(d, "cache", "shards"))
        )
    print(
        json.dumps(
            {
                "images": n,
                "resolution": r,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "on_the_fly_samples_per_s": round(fly, 2),
                "cache_samples_per_s": round(cached, 1),
                "speedup": round(cached / fly, 1),
                "cache_build_s": round(build_s, 2),
                "cache_bytes_per_sample": size // n,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
