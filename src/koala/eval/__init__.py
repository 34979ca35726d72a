"""Scorers that use learned models from local checkpoints (the paper's metrics); the shapes-world scorer, which
needs none, is :mod:`koala.lab.score`."""

from .clip_score import clip_scores, load_clip, score_folder

__all__ = ["clip_scores", "load_clip", "score_folder"]
