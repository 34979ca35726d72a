"""Does the caption or the starting noise place a shapes model's objects? (issue 34)

For the first ``--num`` val prompts that state a relation first ("A REL B, ..."), samples each prompt and its
relation-swapped twin ("B REL A, ...", :func:`koala.lab.order_loss.relation_swap`) from the SAME starting noise
(seed 1000 + i, the pipeline's default sampler). Over the pairs where both objects are found in both images:

- ``holds``: the stated relation holds in the original / in the swapped image (chance: 50 %);
- ``layout unchanged``: A is on the same side of B in both images although the captions say opposite things: the
  noise, not the caption, placed the objects (a model that follows the caption scores 0 %, one that ignores the
  relation 100 %);
- ``both hold``: both images follow their captions;
- ``order sensitivity``: at the first sampling timestep, from the same noise, how much the denoiser's output moves
  when the caption is swapped, relative to how much it moves when the caption is replaced by the next pair's
  caption (other colours and shapes): mean |out(c) - out(swap c)| / mean |out(c) - out(c')|. A denoiser that reads
  the caption as a bag of words gives ~0.

    python benchmarks/bench_relation_swap.py src/koala/assets/shapes-teacher /work/teacher34/pipe --num 80
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def _images(pipe, texts: list[str]) -> list[np.ndarray]:
    from koala.lab.models import default_sampling

    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(texts))]
    out = pipe(texts, generator=gens, output_type="np", **default_sampling()).images
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]


@torch.no_grad()
def order_sensitivity(pipe, pairs: list[tuple[str, str]]) -> float:
    from koala.families import get_family

    fam = get_family("sdxl")
    texts = [c for c, _ in pairs] + [s for _, s in pairs] + [c for c, _ in pairs[1:] + pairs[:1]]
    cond = fam.encode_prompts(texts, [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
    size = torch.tensor([[32, 32]] * len(texts))
    micro = fam.micro_conditions({"original_size": size, "crop_top_left": torch.zeros_like(size), "target_size": size})
    pipe.scheduler.set_timesteps(20)  # the default sampler's first timestep
    t = pipe.scheduler.timesteps[0]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(pairs), pipe.unet.config.in_channels, 16, 16, generator=g).repeat(3, 1, 1, 1)
    x = pipe.scheduler.scale_model_input(noise * pipe.scheduler.init_noise_sigma, t)
    out = fam.forward(pipe.unet, x, t.expand(len(texts)), {**cond, **micro})
    orig, swapped, other = out.split(len(pairs))
    return float((orig - swapped).abs().mean() / (orig - other).abs().mean())


def relation_swap_test(pipeline: str, num: int) -> dict:
    from diffusers import StableDiffusionXLPipeline

    from koala.lab.order_loss import relation_swap
    from koala.lab.score import detect_objects, largest_by_colour, parse_prompt, relation_holds
    from koala.lab.shapes import generate_scenes

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    captions = [s.text for s in generate_scenes(4 * num, "val", 0, 32)]
    pairs = [(c, relation_swap(c)) for c in captions if relation_swap(c)][:num]
    originals, swapped = _images(pipe, [c for c, _ in pairs]), _images(pipe, [s for _, s in pairs])
    rows = []
    for (caption, _), im_o, im_s in zip(pairs, originals, swapped):
        exp = parse_prompt(caption)
        rel = exp.relations[0]
        a, b = exp.objects[rel["a"]]["color"], exp.objects[rel["b"]]["color"]
        found_o, found_s = (largest_by_colour(detect_objects(im)) for im in (im_o, im_s))
        if all(c in f for c in (a, b) for f in (found_o, found_s)):
            rows.append(
                (
                    relation_holds(found_o[a], rel["relation"], found_o[b]),
                    relation_holds(found_s[b], rel["relation"], found_s[a]),
                )
            )
    h = np.array(rows, dtype=bool).reshape(-1, 2)
    sensitivity = order_sensitivity(pipe, pairs)
    return {
        "pipeline": pipeline,
        "pairs": len(pairs),
        "found_in_both": len(h),
        "holds_original": float(h[:, 0].mean()) if len(h) else None,
        "holds_swapped": float(h[:, 1].mean()) if len(h) else None,
        "layout_unchanged": float((h[:, 0] != h[:, 1]).mean()) if len(h) else None,
        "both_hold": float((h[:, 0] & h[:, 1]).mean()) if len(h) else None,
        "order_sensitivity": sensitivity,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipelines", nargs="+", help="shapes pipeline directories")
    ap.add_argument("--num", type=int, default=80, help="prompt pairs (default 80)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    rows = [relation_swap_test(p, args.num) for p in args.pipelines]
    print(
        "| pipeline | pairs (both found) | holds: original | holds: swapped | layout unchanged | both hold "
        "| order sensitivity |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["found_in_both"]:
            print(f"| {r['pipeline']} | {r['pairs']} (0) | - | - | - | - | {r['order_sensitivity']:.3f} |")
            continue
        print(
            f"| {r['pipeline']} | {r['pairs']} ({r['found_in_both']}) | {100 * r['holds_original']:.0f} % "
            f"| {100 * r['holds_swapped']:.0f} % | {100 * r['layout_unchanged']:.0f} % "
            f"| {100 * r['both_hold']:.0f} % | {r['order_sensitivity']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
