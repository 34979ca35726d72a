"""Looking at a denoiser's features while it generates: cross-layer cosine similarity (paper Fig. 11), teacher vs
student similarity per mapped layer, and PCA of self-attention outputs (Fig. 3).

Features are taken from forward hooks on the denoiser of a loaded pipeline (:mod:`koala.inference`) while it
samples real prompts, so they are the features of the sampling trajectory, at every step (similarity) or at the
step nearest a given timestep (PCA). A student compared with its teacher is run inside the teacher's forward on
the very same inputs (latents, timestep, conditioning).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..arch.layer_map import LayerMap, MapEntry
from ..families import denoiser_of

TRANSFORMER_BLOCKS = ".transformer_blocks."


def transformer_groups(lmap: LayerMap) -> dict[str, list[MapEntry]]:
    """Transformer layers grouped by the block that stacks them (an SDXL attention block such as
    ``down_blocks.2.attentions.0``; a DiT's whole stack), in order; keys read ``STAGE container``."""
    groups: dict[str, list[MapEntry]] = {}
    for e in lmap.of_kind("transformer_layer"):
        if TRANSFORMER_BLOCKS in e.student:
            key = f"{e.stage} {e.student.rsplit(TRANSFORMER_BLOCKS, 1)[0]}"
        else:
            key = "all blocks"
        groups.setdefault(key, []).append(e)
    return groups


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Recorder:
    """Forward hooks on named modules; outputs kept (detached) only while ``active``."""

    def __init__(self, model, names):
        self.active, self.out = False, {}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(_m, _a, output):
            if self.active:
                self.out[name] = _first(output).detach().float()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _timestep(args, kwargs) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    return None if t is None else float(torch.as_tensor(t).flatten()[0])


def _generate(loaded, prompts, steps, cfg, seed):
    from ..inference import generate

    return generate(loaded, prompts, steps=steps, cfg=cfg, seed=seed, progress=False, log=lambda *_: None).images


@torch.no_grad()
def layer_similarity(
    loaded,
    prompts: list[str],
    lmap: LayerMap,
    student=None,
    student_lmap: LayerMap | None = None,
    steps: int = 10,
    cfg: float = 3.5,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Mean cosine similarity between the outputs of every pair of transformer layers of each group (Fig. 11),
    over prompts, sampling steps and the batch (each sample's output flattened to one vector). With ``student``
    (and its layer map), also the mean cosine between each student layer's output and its mapped teacher layer's,
    the student run on the teacher's inputs at every step."""
    from ..utils.console import progress_bar

    model = denoiser_of(loaded.pipe)
    groups = transformer_groups(lmap)
    sums = {k: torch.zeros(len(g), len(g), dtype=torch.float64) for k, g in groups.items()}
    pairs = student_lmap.of_kind("transformer_layer") if student is not None else []
    names = [e.student for g in groups.values() for e in g] + [e.teacher for e in pairs]
    rec = _Recorder(model, list(dict.fromkeys(names)))
    s_rec = _Recorder(student, [e.student for e in pairs]) if student is not None else None
    pair_sums = {e.student: 0.0 for e in pairs}
    calls = [0]

    def after(module, args, kwargs, _output):
        if s_rec is not None:
            s_rec.active = True
            student(*args, **kwargs)
            s_rec.active = False
            for e in pairs:
                a, b = s_rec.out[e.student], rec.out[e.teacher]
                pair_sums[e.student] += F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean().item()
            s_rec.out.clear()
        for key, entries in groups.items():
            feats = torch.stack([F.normalize(rec.out[e.student].flatten(1), dim=1) for e in entries])  # [L, B, D]
            sums[key] += torch.einsum("lbd,mbd->lm", feats, feats).double() / feats.shape[1]
        rec.out.clear()
        calls[0] += 1

    handle = model.register_forward_hook(after, with_kwargs=True)
    rec.active = True
    try:
        for p in progress_bar(prompts, desc="prompts", disable=not progress):
            _generate(loaded, [p], steps, cfg, seed)
    finally:
        handle.remove()
        rec.remove()
        if s_rec is not None:
            s_rec.remove()
    n = max(calls[0], 1)
    out = {
        "forwards": calls[0],
        "groups": {k: {"layers": [e.student for e in groups[k]], "matrix": (sums[k] / n).tolist()} for k in groups},
    }
    if s_rec is not None:
        out["student_vs_teacher"] = {
            e.student: {"teacher": e.teacher, "stage": e.stage, "cosine": pair_sums[e.student] / n} for e in pairs
        }
    return out


def sa_modules(lmap: LayerMap) -> dict[str, str]:
    """Stage -> the self-attention module of the stage's last transformer layer (what Fig. 3 shows per stage)."""
    out: dict[str, str] = {}
    for e in lmap.of_kind("transformer_layer"):
        out[e.stage] = f"{e.student}.attn1"
    return out


def pca_rgb(tokens: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, list[float]]:
    """Top-3 principal components of ``tokens`` [N, C] as an RGB image [h, w, 3] in [0, 1] (each component
    min-max scaled), with their explained-variance ratios. ``h x w = N`` follows the latent's aspect ratio."""
    x = tokens.double() - tokens.double().mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(3, vh.shape[0])
    proj = x @ vh[:k].T
    if k < 3:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - k)], 1)
    lo, hi = proj.min(0).values, proj.max(0).values
    img = ((proj - lo) / (hi - lo).clamp_min(1e-12)).float()
    n = tokens.shape[0]
    h = max(1, round(math.sqrt(n * height / width)))
    w = n // h
    var = (s**2 / (s**2).sum()).tolist()[:3]
    return img[: h * w].reshape(h, w, 3), var


@torch.no_grad()
def sa_pca(
    loaded, prompt: str, lmap: LayerMap, timestep: float = 500, steps: int = 10, cfg: float = 3.5, seed: int = 0
) -> dict:
    """Generate ``prompt`` and take, at the sampling step whose timestep is nearest ``timestep``, each stage's
    self-attention output (the conditional sample of the CFG batch) as a PCA RGB image. Returns the generated
    image, the step's timestep and per stage the PCA image and explained-variance ratios."""
    pipe = loaded.pipe
    model = denoiser_of(pipe)
    pipe.scheduler.set_timesteps(steps)
    ts = [float(t) for t in pipe.scheduler.timesteps]
    chosen = min(ts, key=lambda t: abs(t - timestep))
    mods = sa_modules(lmap)
    rec = _Recorder(model, list(mods.values()))
    taken: dict[str, torch.Tensor] = {}

    def pre(_m, args, kwargs):
        t = _timestep(args, kwargs)
        rec.active = t is not None and abs(t - chosen) < 1e-3 and not taken

    def post(_m, _a, _k, _o):
        if rec.active:
            taken.update({s: rec.out[n][-1] for s, n in mods.items()})  # the last sample: the conditional one
        rec.active = False

    h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = model.register_forward_hook(post, with_kwargs=True)
    try:
        image = _generate(loaded, [prompt], steps, cfg, seed)[0]
    finally:
        h1.remove()
        h2.remove()
        rec.remove()
    stages = {}
    for stage, tokens in taken.items():
        tokens = tokens.reshape(-1, tokens.shape[-1]) if tokens.ndim > 2 else tokens
        rgb, var = pca_rgb(tokens, image.size[1], image.size[0])
        stages[stage] = {
            "module": mods[stage],
            "tokens": list(tokens.shape),
            "grid": list(rgb.shape[:2]),
            "explained_variance": var,
            "rgb": rgb,
        }
    return {"image": image, "timestep": chosen, "stages": stages}
