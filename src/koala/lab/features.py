"""The feature-KD choices of `koala demo` and the shapes study (torch-free: the CLI lists them in --help)."""

FEATURES = {
    "SA+LF": {"SA": "all", "LF": ["first", "last"]},  # the paper's: DW-1 and UP-3 on SDXL
    "SA": {"SA": "all"},
    "CA": {"CA": "all"},
    "FFN": {"FFN": "all"},
    "Res": {"Res": "all"},
    "LF-all": {"LF": "all"},  # BK: the last feature of every stage (every block of a DiT)
    "none": {},
}


def feature_spec(features) -> dict:
    """``kd.features`` for a :data:`FEATURES` name or a mapping given as is."""
    return dict(FEATURES[features] if isinstance(features, str) else features)
