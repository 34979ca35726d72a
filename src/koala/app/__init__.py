"""``koala app``: teacher and students side by side in a local web page (Gradio; optional extra ``[app]``).

:mod:`koala.app.compare` is the framework-free part (load once, generate with every model, numbers per model);
:mod:`koala.app.ui` builds the page on it.
"""

from .compare import ModelResult, ModelSpec, Request, Slot, compare, load_models, results_json

__all__ = ["ModelResult", "ModelSpec", "Request", "Slot", "compare", "load_models", "results_json"]
