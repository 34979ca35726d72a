"""Self-attention knowledge distillation (KOALA Sec. 3.1.2): feature hooks, losses, trainer (`koala distill`)."""

from .config import load_config
from .hooks import FEATURE_TYPES, FeaturePair, FeatureRecorder, feature_pairs, unwrap
from .losses import FEATURE_LOSSES, Losses, feature_losses, kd_losses, prediction_target

__all__ = [
    "load_config",
    "FEATURE_TYPES",
    "FeaturePair",
    "FeatureRecorder",
    "feature_pairs",
    "unwrap",
    "FEATURE_LOSSES",
    "Losses",
    "feature_losses",
    "kd_losses",
    "prediction_target",
    "train",
]


def train(cfg) -> dict:
    """Run distillation for a resolved config (see :func:`load_config`)."""
    from .trainer import train as _train

    return _train(cfg)
