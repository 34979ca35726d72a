"""U-Net forward time of a shapes teacher against today's packaged one (issue 34: within 1.25x).

Times the denoiser forward the sampler runs (batch 2: classifier-free guidance, 16x16 latents, the packaged
teacher's conditioning shapes), fp32, interleaving the two models so machine load hits both alike; reports the
median of ``--repeats`` and the ratio. ``--candidate`` is a trained pipeline directory (e.g. /work/teacher34/pipe);
without it the candidate is the U-Net the teacher recipe trains (``build_shapes_pipeline``: same config, random
weights), which is what a run of ``koala lab train-teacher`` produces::

    python benchmarks/bench_teacher_unet.py --threads 1 --repeats 200 --candidate /work/teacher34/pipe
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def forward_inputs(unet, batch: int = 2) -> dict:
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    n = cfg.addition_time_embed_dim * 6
    return {
        "sample": torch.randn(batch, cfg.in_channels, 16, 16, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 32, cfg.cross_attention_dim, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, cfg.projection_class_embeddings_input_dim - n, generator=g),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * batch),
        },
    }


@torch.no_grad()
def main() -> None:
    from diffusers import UNet2DConditionModel

    from koala.lab.models import build_shapes_pipeline, shapes_teacher_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidate", default=None, help="pipeline dir (default: the recipe's U-Net, random weights)")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = UNet2DConditionModel.from_pretrained(shapes_teacher_dir(), subfolder="unet", dtype=torch.float32).eval()
    if args.candidate:
        cand = UNet2DConditionModel.from_pretrained(args.candidate, subfolder="unet", dtype=torch.float32).eval()
    else:
        cand = build_shapes_pipeline(0).unet.eval()
    same = {k: v for k, v in base.config.items() if not k.startswith("_")} == {
        k: v for k, v in cand.config.items() if not k.startswith("_")
    }
    x = forward_inputs(base)
    times: dict[str, list[float]] = {"packaged": [], "candidate": []}
    for _ in range(5):
        base(**x), cand(**x)  # warm-up
    for _ in range(args.repeats):
        for name, m in (("packaged", base), ("candidate", cand)):
            t = time.perf_counter()
            m(**x)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    res = {
        "candidate": args.candidate or "build_shapes_pipeline (the recipe's U-Net)",
        "same_config": same,
        "params": {
            "packaged": sum(p.numel() for p in base.parameters()),
            "candidate": sum(p.numel() for p in cand.parameters()),
        },
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "ratio": round(med["candidate"] / med["packaged"], 3),
        "threads": args.threads,
        "repeats": args.repeats,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
