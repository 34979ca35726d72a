"""T2I-CompBench (Huang et al. 2023), the paper's compositionality benchmark, from local checkpoints.

Categories and scores, as the benchmark defines them (T2I-CompBench at commit 1b70949):

- **color / shape / texture: B-VQA.** The prompt's noun phrases ("a green bench", "a blue bowl") are each asked
  as a question ("a green bench?") to BLIP-VQA; the answer's yes-probability is ``P(yes) / (P(yes) + P(no))`` from the
  decoder's first-step softmax; an image's score is the product over its phrases; the category score the mean over
  images. BLIP VQA runs through transformers (``BlipForQuestionAnswering``; the benchmark's checkpoint is
  model_base_vqa_capfilt_large, in transformers format Salesforce/blip-vqa-capfilt-large), images resized to the
  model's size (bicubic, no crop).
- **spatial.** Two objects and a relation ("a dog on the left of a bench"); each object's best detection; centres
  c1, c2, ``dx = c2x - c1x``, ``dy = c2y - c1y`` in a frame whose short side is 479 px (UniDet's input size).
  left of: ``dx > 0`` and ``|dx| > |dy|``, right of: ``dx < 0`` and ``|dx| > |dy|``, bottom of: ``dy < 0`` and
  ``|dy| > |dx|``, top of: ``dy > 0`` and ``|dy| > |dx|``: then 1 if IoU < 0.1, else 0.1 / IoU; otherwise 0.
  near / next to / on side of: 1 if ``|dx| < 150`` or ``|dy| < 150``, else ``150 / max(|dx|, |dy|)``. Image score:
  ``0.25 s1 + 0.25 s2 + pos / 2`` with both detected (s: detection confidences), ``0.25 s`` with one, 0 with none,
  and 0 when below 0.5. **Differs:** the benchmark detects with UniDet (detectron2), which has no transformers
  port; koala uses an open-vocabulary detector through transformers (OWL-ViT / OWLv2, queried with the two object
  names), whose confidences are on another scale than UniDet's.
- **non_spatial: CLIP.** The cosine of CLIP ViT-B/32's normalised image and prompt embeddings (no x100, no clamp).
- **complex: 3-in-1.** Per image, (B-VQA + spatial) / 2 for prompts with a spatial relation, (B-VQA + CLIP) / 2
  for the others, or the mean of all three for the prompts the benchmark lists as spatial *and* action; with the
  benchmark's ``complex_val_spatial.txt`` / ``complex_val_action.txt`` given, their lists decide, as in the original;
  CLIP on complex prompts drops adjectives (spaCy there; a word list here).

Noun phrases and object names: the benchmark uses spaCy's en_core_web_sm, which is not on the package registry;
when spaCy and that model are installed koala uses them, else a rule-based chunker that splits CompBench's
templated prompts on "and", commas and the relation phrase (the same phrases on those templates).
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import KoalaError
from .clip_score import check_model_dir

CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
RELATIONS = (
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)
DROPPED_CHUNKS = {"top", "the side", "the left", "the right"}
PERSON = {"girl", "boy", "man", "woman"}
_DET = {"a", "an", "the", "some", "two", "three", "one"}


# ------------------------------------------------------------------------------------------- language
def _spacy():
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except Exception:  # noqa: BLE001 - spaCy or its English model not installed: the rule-based chunker
        return None


_NLP: list = []


def nlp():
    if not _NLP:
        _NLP.append(_spacy())
    return _NLP[0]


def noun_phrases(prompt: str) -> list[str]:
    """The prompt's noun phrases, minus the benchmark's dropped chunks ('top', 'the side', 'the left', 'the right')."""
    model = nlp()
    if model is not None:
        chunks = [c.text for c in model(prompt).noun_chunks]
    else:
        text = prompt.strip().rstrip(".")
        for rel in sorted(RELATIONS, key=len, reverse=True):
            text = re.sub(rf"\b{rel}\b", " | ", text, flags=re.I)
        parts = re.split(r"\s*(?:,|\band\b|\|)\s*", text)
        chunks = [p.strip() for p in parts if p.strip()]
    return [c for c in chunks if c not in DROPPED_CHUNKS]


def relation_of(prompt: str) -> str | None:
    """The first of the benchmark's relation phrases that occurs in the prompt (its order, as the benchmark)."""
    low = prompt.lower()
    return next((r for r in RELATIONS if r in low), None)


def _head(phrase: str) -> str | None:
    words = [w for w in re.findall(r"[A-Za-z]+", phrase.lower()) if w not in _DET]
    return words[-1] if words else None


def spatial_objects(prompt: str) -> tuple[str | None, str | None]:
    """(object 1, object 2) of a spatial prompt: the nouns before and after the relation (girl / boy / man /
    woman -> person, as the benchmark maps them to its detector's label)."""
    model = nlp()
    if model is not None:
        nouns = [t.text for t in model(prompt) if t.pos_ == "NOUN"]
        o1, o2 = (nouns[0], nouns[-1]) if nouns else (None, None)
    else:
        rel = relation_of(prompt)
        if rel is None:
            return None, None
        before, _, after = prompt.lower().rstrip(".").partition(rel)
        o1, o2 = _head(re.split(r"\band\b|,", before)[-1]), _head(re.split(r"\band\b|,", after)[0])
    fix = lambda o: "person" if o in PERSON else o  # noqa: E731
    return fix(o1), fix(o2)


def drop_adjectives(prompt: str) -> str:
    """The prompt without adjectives (the benchmark's CLIP text for complex prompts): spaCy's ADJ tags, else the
    colour / shape / texture words of CompBench's vocabulary."""
    model = nlp()
    if model is not None:
        return " ".join(t.text for t in model(prompt) if t.pos_ != "ADJ")
    return " ".join(w for w in prompt.split() if w.lower().strip(".,") not in ATTRIBUTE_WORDS)


ATTRIBUTE_WORDS = set(
    """red orange yellow green blue purple pink brown black white gray grey silver gold golden
round square rectangular triangular oval circular cubic spherical cylindrical big small tall short long large tiny huge
wooden metallic plastic glass leather fabric fluffy rubber furry soft hard smooth rough shiny""".split()
)


# ------------------------------------------------------------------------------------------- B-VQA
class BlipVQA:
    """Yes-probability of a question about an image, through transformers' BLIP VQA (local checkpoint)."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import BlipForQuestionAnswering, BlipProcessor

        check_model_dir(path, "BLIP VQA checkpoint", "blip", "e.g. Salesforce/blip-vqa-capfilt-large", "vqa")
        self.model = BlipForQuestionAnswering.from_pretrained(path).to(device).eval()
        self.processor = BlipProcessor.from_pretrained(path)
        tok = self.processor.tokenizer
        self.yes, self.no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
        if tok.unk_token_id in (self.yes, self.no):
            raise KoalaError(f"BLIP VQA checkpoint {path}: its tokenizer has no 'yes' / 'no' token", option="vqa")
        size = self.model.config.vision_config.image_size
        self.size = {"height": size, "width": size}
        self.device = device

    @torch.no_grad()
    def yes_prob(self, images: list, questions: list[str]) -> list[float]:
        m = self.model
        inputs = self.processor(
            images=images,
            text=[q.lower() for q in questions],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=35,
            size=self.size,
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        image_embeds = m.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        q = m.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        )[0]
        bos = torch.full((q.shape[0], 1), m.decoder_start_token_id, dtype=torch.long, device=q.device)
        logits = (
            m.text_decoder(input_ids=bos, encoder_hidden_states=q, encoder_attention_mask=inputs["attention_mask"])
            .logits[:, 0]
            .float()
        )
        p = logits.softmax(-1)
        return (p[:, self.yes] / (p[:, self.yes] + p[:, self.no])).tolist()

    def bvqa(self, images: list, prompts: list[str]) -> list[float]:
        """Per image: the product of the yes-probabilities of its prompt's noun phrases ("PHRASE?")."""
        pairs = [(i, f"{ph}?") for i, p in enumerate(prompts) for ph in noun_phrases(p)]
        out = [1.0] * len(images)
        for k in range(0, len(pairs), 16):
            chunk = pairs[k : k + 16]
            for (i, _), pr in zip(chunk, self.yes_prob([images[i] for i, _ in chunk], [q for _, q in chunk])):
                out[i] *= pr
        return out


# ------------------------------------------------------------------------------------------- spatial
def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def position_score(box1, box2, relation: str) -> float:
    """The benchmark's relation score of two boxes (x0, y0, x1, y1) in UniDet's ~479 px frame."""
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    dx, dy = c2[0] - c1[0], c2[1] - c1[1]
    if relation in ("near", "next to", "on side of"):
        return 1.0 if abs(dx) < 150 or abs(dy) < 150 else 150 / max(abs(dx), abs(dy))
    ok = {
        "on the left of": dx > 0 and abs(dx) > abs(dy),
        "on the right of": dx < 0 and abs(dx) > abs(dy),
        "on the bottom of": dy < 0 and abs(dy) > abs(dx),
        "on the top of": dy > 0 and abs(dy) > abs(dx),
    }.get(relation)
    if not ok:  # (the benchmark scores 'on top of' 0 always; kept)
        return 0.0
    iou = _box_iou(box1, box2)
    return 1.0 if iou < 0.1 else 0.1 / iou


def spatial_score(det1, det2, relation: str | None) -> float:
    """``det``: (confidence, box) of an object's best detection, or None. The benchmark's image score."""
    if det1 and det2 and relation:
        s = 0.25 * det1[0] + 0.25 * det2[0] + position_score(det1[1], det2[1], relation) / 2
    elif det1 or det2:
        s = 0.25 * (det1 or det2)[0]
    else:
        s = 0.0
    return s if s >= 0.5 else 0.0


class Detector:
    """Open-vocabulary detection through transformers (OWL-ViT / OWLv2 from a local checkpoint)."""

    def __init__(self, path: str, device: str = "cpu", threshold: float = 0.1):
        import transformers

        cfg = check_model_dir(
            path, "detector checkpoint", ("owlvit", "owlv2"), "e.g. google/owlv2-base-patch16-ensemble", "detector"
        )
        arch = {"owlvit": "OwlViT", "owlv2": "Owlv2"}[cfg["model_type"]]
        self.model = getattr(transformers, f"{arch}ForObjectDetection").from_pretrained(path).to(device).eval()
        self.processor = getattr(transformers, f"{arch}Processor").from_pretrained(path)
        self.threshold, self.device = threshold, device
        self.pads_to_square = arch == "Owlv2"  # OWLv2 pads to a square, OWL-ViT resizes to one

    @torch.no_grad()
    def best(self, image, names: list[str]) -> list[tuple[float, tuple] | None]:
        """Per name: (confidence, box in a frame with short side 479 px) of its best detection, or None."""
        inputs = self.processor(text=[[f"a photo of a {n}" for n in names]], images=image, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model(**inputs)
        w, h = image.size
        side = max(w, h)  # boxes are relative to the padded square (OWLv2) or to the whole image (OWL-ViT)
        target = [[side, side]] if self.pads_to_square else [[h, w]]
        post = (
            getattr(self.processor, "post_process_grounded_object_detection", None)
            or self.processor.post_process_object_detection
        )
        res = post(out, threshold=self.threshold, target_sizes=torch.tensor(target))[0]
        scale = min(479 / min(w, h), 480 / max(w, h))
        best: list = [None] * len(names)
        for score, label, box in zip(res["scores"].tolist(), res["labels"].tolist(), res["boxes"].tolist()):
            if best[label] is None or score > best[label][0]:
                best[label] = (score, tuple(v * scale for v in box))
        return best

    def spatial(self, images: list, prompts: list[str]) -> list[float]:
        out = []
        for im, p in zip(images, prompts):
            o1, o2 = spatial_objects(p)
            if not o1 or not o2:
                out.append(0.0)
                continue
            d1, d2 = self.best(im, [o1, o2])
            out.append(spatial_score(d1, d2, relation_of(p)))
        return out


# ------------------------------------------------------------------------------------------- categories
def _lines(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {ln.strip().lower().split(".")[0] for ln in f if ln.strip()}


def complex_kind(prompt: str, lists: dict | None = None) -> str:
    """'spatial', 'action' or 'both': which scores a complex prompt's 3-in-1 averages with B-VQA."""
    if lists:
        key = prompt.strip().lower().split(".")[0]
        if key in lists.get("spatial", ()):
            return "spatial"
        if key in lists.get("action", ()):
            return "action"
        return "both"
    return "spatial" if relation_of(prompt) else "action"


def load_complex_lists(folder: str | None) -> dict | None:
    """The benchmark's complex_val_spatial.txt / complex_val_action.txt (one prompt per line), when given."""
    if not folder:
        return None
    out = {}
    for kind in ("spatial", "action"):
        f = os.path.join(folder, f"complex_val_{kind}.txt")
        if not os.path.isfile(f):
            raise KoalaError(
                f"{folder}: no complex_val_{kind}.txt (T2I-CompBench's examples/dataset/)", option="complex_lists"
            )
        out[kind] = _lines(f)
    return out


class CompBench:
    """Score images for one category; the models load on first use."""

    def __init__(
        self,
        vqa: str | None = None,
        detector: str | None = None,
        clip: str | None = None,
        device: str = "cpu",
        complex_lists: str | None = None,
        detector_threshold: float = 0.1,
    ):
        self.paths = {"vqa": vqa, "detector": detector, "clip": clip}
        self.device, self.threshold = device, detector_threshold
        self.lists = load_complex_lists(complex_lists)
        self._models: dict = {}

    def _get(self, kind: str):
        if kind not in self._models:
            path = self.paths[kind]
            if not path:
                raise KoalaError(
                    f"this category needs a {'BLIP VQA' if kind == 'vqa' else kind} checkpoint ({kind})", option=kind
                )
            if kind == "vqa":
                self._models[kind] = BlipVQA(path, self.device)
            elif kind == "detector":
                self._models[kind] = Detector(path, self.device, self.threshold)
            else:
                from .clip_score import load_clip

                self._models[kind] = load_clip(path, self.device)
        return self._models[kind]

    def needs(self, category: str) -> tuple[str, ...]:
        return {"spatial": ("detector",), "non_spatial": ("clip",), "complex": ("vqa", "detector", "clip")}.get(
            category, ("vqa",)
        )

    def clip(self, images, texts) -> list[float]:
        from .clip_score import clip_cosines

        model, proc = self._get("clip")
        return clip_cosines(images, texts, model, proc)

    def score(self, category: str, images: list, prompts: list[str]) -> list[float]:
        if category not in CATEGORIES:
            raise KoalaError(
                f"unknown T2I-CompBench category {category!r}; choose {', '.join(CATEGORIES)}", option="category"
            )
        if category in ("color", "shape", "texture"):
            return self._get("vqa").bvqa(images, prompts)
        if category == "spatial":
            return self._get("detector").spatial(images, prompts)
        if category == "non_spatial":
            return self.clip(images, prompts)
        bvqa = self._get("vqa").bvqa(images, prompts)
        kinds = [complex_kind(p, self.lists) for p in prompts]
        spatial = self._get("detector").spatial(images, prompts)
        clip = self.clip(images, [drop_adjectives(p) for p in prompts])
        out = []
        for k, b, s, c in zip(kinds, bvqa, spatial, clip):
            out.append((b + s) / 2 if k == "spatial" else (b + c) / 2 if k == "action" else (b + s + c) / 3)
        return out


def score_folder(folder: str, category: str, bench: CompBench, limit: int | None = None) -> dict:
    """One category's score of a folder (prompts from metadata.jsonl or PNG chunks); unreadable images skipped."""
    from .folder import read_prompted_images

    data = read_prompted_images(folder, limit)
    images, prompts, names, skipped = data.images, data.prompts, data.names, data.skipped
    scores = bench.score(category, images, prompts)
    return {
        "schema": "koala-eval-compbench/1",
        "folder": folder,
        "category": category,
        "score": sum(scores) / len(scores),
        "n_images": len(scores),
        "skipped": skipped,
        "per_image": [{"file_name": n, "text": t, "score": s} for n, t, s in zip(names, prompts, scores)],
    }
