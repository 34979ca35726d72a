"""The teacher recipe's training state, saved with every checkpoint so a stopped run resumes bit-exactly.

``OUT/train_state/`` holds everything the next step depends on:

* ``tensors.safetensors``: the trained modules' raw (non-EMA, fp32) weights, the AdamW moments, the EMA shadow
  weights, the data (VAE latents, so a resumed run needs neither the images nor a re-encode) and the random
  generators' states (the recipe's own generator, which draws data order, noise, timesteps and caption dropout,
  and torch's global one);
* ``state.json``: the step, the recipe config, the optimizer's param groups, the LR schedule's and the EMAs'
  scalars and the captions.

Only safetensors and JSON: nothing is unpickled. Written inside the checkpoint directory, so the pipeline and the
state it came from are replaced together, atomically.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from ..errors import KoalaError
from ..utils.weights import check_safetensors

STATE_DIR = "train_state"


def has_state(out: str) -> bool:
    return os.path.isfile(os.path.join(out, STATE_DIR, "state.json"))


def _split(prefix: str, d: dict, tensors: dict) -> dict:
    """Move the tensors of a (nested) state dict into ``tensors`` under ``prefix``; return the rest (JSON)."""
    rest = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().clone().contiguous()
        elif isinstance(v, dict):
            rest[k] = {"__nested__": _split(key, v, tensors)}
        elif isinstance(v, list) and v and all(isinstance(x, torch.Tensor) for x in v):
            for i, x in enumerate(v):
                tensors[f"{key}.{i}"] = x.detach().clone().contiguous()
            rest[k] = {"__tensor_list__": len(v)}
        else:
            rest[k] = v
    return rest


def _join(prefix: str, rest: dict, tensors: dict, int_keys: bool = False) -> dict:
    out = {}
    for k, v in rest.items():
        key = f"{prefix}.{k}"
        kk = int(k) if int_keys and k.isdigit() else k
        if isinstance(v, dict) and "__nested__" in v:
            out[kk] = _join(key, v["__nested__"], tensors, int_keys=(k == "state"))
        elif isinstance(v, dict) and "__tensor_list__" in v:
            out[kk] = [tensors[f"{key}.{i}"] for i in range(v["__tensor_list__"])]
        else:
            out[kk] = v
    for name, t in tensors.items():  # plain tensors of this level
        if name.startswith(prefix + ".") and "." not in name[len(prefix) + 1 :]:
            k = name[len(prefix) + 1 :]
            out[int(k) if int_keys and k.isdigit() else k] = t
    return out


def write_state(folder: str, *, step: int, config: dict, modules, names, opt, sched, emas, g, data) -> None:
    """Write the state into ``folder/train_state`` (``data``: ``{"latents": tensor, "captions": [...]}``)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in zip(names, modules):
        for k, v in m.state_dict().items():
            tensors[f"model.{name}.{k}"] = v.detach().clone().contiguous()
    meta = {
        "step": step,
        "config": config,
        "optimizer": _split("opt", opt.state_dict(), tensors),
        "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
        "emas": [_split(f"ema{i}", e.state_dict(), tensors) for i, e in enumerate(emas)],
        "captions": data["captions"],
    }
    tensors["rng.recipe"] = g.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["data.latents"] = data["latents"].contiguous()
    d = os.path.join(folder, STATE_DIR)
    os.makedirs(d, exist_ok=True)
    save_file(tensors, os.path.join(d, "tensors.safetensors"))
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump(meta, f)


def read_state(out: str) -> tuple[dict, dict]:
    """``(state.json, tensors)`` of ``out``'s saved state; the tensors file's header is checked first."""
    d = os.path.join(out, STATE_DIR)
    if not has_state(out):
        raise KoalaError(
            f"{out} has no {STATE_DIR}/state.json to resume from (written by `koala lab train-teacher` at each "
            "checkpoint); drop --resume to start a new run",
            option="resume",
        )
    path = os.path.join(d, "tensors.safetensors")
    check_safetensors(path)
    with open(os.path.join(d, "state.json")) as f:
        meta = json.load(f)
    return meta, load_file(path)


def restore_state(meta: dict, tensors: dict, *, modules, names, opt, sched, emas, g) -> int:
    """Load a saved state into freshly built modules, optimizer, schedule, EMAs and generator; the step."""
    for name, m in zip(names, modules):
        p = f"model.{name}."
        m.load_state_dict({k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)})
    opt.load_state_dict(_join("opt", meta["optimizer"], tensors))
    sched.load_state_dict({**sched.state_dict(), **meta["scheduler"]})
    for i, (e, rest) in enumerate(zip(emas, meta["emas"])):
        e.load_state_dict(_join(f"ema{i}", rest, tensors))
    g.set_state(tensors["rng.recipe"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])
