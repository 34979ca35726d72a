"""The trainer's checkpoint-size estimate (what the free-space check and the start-of-run warning use) against the
bytes a checkpoint really takes, for the tiny recipes: a 2-step run with a checkpoint at each step, on a tiny
pipeline made here.

    python benchmarks/checkpoint_estimate.py [--markdown benchmarks/results/checkpoint-estimate.md]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = ("tiny", "tiny-fewstep", "tiny-dmd")


def measure(recipe: str, pipe: str, out: str) -> tuple[int, int]:
    """(estimated bytes at the last checkpoint, bytes the last checkpoint holds on disk)."""
    from koala.distill import load_config, trainer

    estimates = []
    real = trainer.checkpoint_bytes

    def spy(d):
        estimates.append(real(d))
        return estimates[-1]

    trainer.checkpoint_bytes = spy
    try:
        cfg = load_config(
            recipe,
            [
                f"teacher.pipeline={pipe}",
                f"train.output_dir={out}",
                "train.max_steps=2",
                "train.checkpoint_every=1",
                "validation.every=0",
                "train.log_with=none",
                "train.progress=false",
                "data.num_samples=4",
            ],
        )
        ckpt = trainer.train(cfg)["checkpoint"]
    finally:
        trainer.checkpoint_bytes = real
    written = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(ckpt) for f in files)
    return estimates[-1], written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    from koala.testing.tiny import save_tiny_pipeline

    lines = ["| recipe | estimated bytes | written bytes | estimated / written |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = os.path.join(tmp, "pipe")
        save_tiny_pipeline(pipe, seed=0)
        for recipe in RECIPES:
            est, written = measure(recipe, pipe, os.path.join(tmp, recipe))
            lines.append(f"| {recipe} | {est:,} | {written:,} | {est / written:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
