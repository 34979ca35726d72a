"""How far apart a shapes teacher's text encoders put a caption and the same words in another order (issue 34).

For the first ``--num`` val prompts' hard negatives (``koala.lab.order_loss.hard_negatives``: subject/object
swapped, colours swapped) prints the cosine similarity of caption and negative on the token-mean of
``prompt_embeds`` and on the pooled embedding (what the word-order loss pushes below its margin), for the packaged
teacher, the untrained recipe pipeline and any ``--pipeline`` dirs::

    PYTHONPATH=src python benchmarks/bench_order_cos.py --pipeline /work/teacher34/pipe
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


@torch.no_grad()
def order_cos(pipe, captions: list[str]) -> dict:
    from koala.families import get_family
    from koala.lab.order_loss import hard_negatives

    fam = get_family("sdxl")
    toks, encs = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    pairs = hard_negatives(captions)
    c = fam.encode_prompts([captions[i] for i, _ in pairs], toks, encs)
    n = fam.encode_prompts([x for _, x in pairs], toks, encs)
    tm = F.cosine_similarity(c["prompt_embeds"].mean(1), n["prompt_embeds"].mean(1), dim=-1)
    po = F.cosine_similarity(c["pooled_prompt_embeds"], n["pooled_prompt_embeds"], dim=-1)
    return {
        "pairs": len(pairs),
        "token_mean": (float(tm.mean()), float(tm.min())),
        "pooled": (float(po.mean()), float(po.min())),
    }


def main() -> None:
    from diffusers import StableDiffusionXLPipeline

    from koala.lab.models import build_shapes_pipeline, load_shapes_teacher
    from koala.lab.shapes import generate_scenes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", action="append", default=[], help="a shapes pipeline dir (repeatable)")
    ap.add_argument("--num", type=int, default=200)
    args = ap.parse_args()
    captions = [s.text for s in generate_scenes(args.num, "val", 0, 32)]
    pipes = {"packaged teacher": load_shapes_teacher(), "untrained": build_shapes_pipeline(0)}
    pipes.update({d: StableDiffusionXLPipeline.from_pretrained(d) for d in args.pipeline})
    print("| text encoders | negatives | token-mean cos, mean (min) | pooled cos, mean (min) |\n|---|---|---|---|")
    for name, pipe in pipes.items():
        r = order_cos(pipe, captions)
        tm, po = r["token_mean"], r["pooled"]
        print(f"| {name} | {r['pairs']} | {tm[0]:.4f} ({tm[1]:.4f}) | {po[0]:.4f} ({po[1]:.4f}) |")


if __name__ == "__main__":
    main()
