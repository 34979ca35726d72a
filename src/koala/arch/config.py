"""Model configs as koala derives new ones from them."""

from __future__ import annotations

import copy
from typing import Any


def public_config(config) -> dict[str, Any]:
    """A deep copy of a diffusers model config without its private bookkeeping keys (``_diffusers_version``,
    ``_name_or_path``, ...); ``_class_name`` stays, since it names the model class."""
    return {k: copy.deepcopy(v) for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
