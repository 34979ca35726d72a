"""The overrides the tiny distillation tests share: a quiet, short run of a shipped tiny recipe."""

from koala.distill import load_config


def tiny_run_config(recipe: str, pipe_dir, out, *extra):
    """``recipe`` on the tiny pipeline ``pipe_dir`` into ``out``: no progress bar, validation or periodic
    checkpoints, 4 synthetic samples, every step logged; ``extra`` overrides last."""
    return load_config(
        recipe,
        [
            f"teacher.pipeline={pipe_dir}",
            f"train.output_dir={out}",
            "train.progress=false",
            "validation.every=0",
            "train.checkpoint_every=0",
            "data.num_samples=4",
            "train.log_every=1",
            *extra,
        ],
    )
