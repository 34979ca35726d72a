"""GenEval's models from local checkpoints: the Mask2Former detector (transformers' port) and the CLIP colour
classifier, the scorer that judges images with them (:mod:`.geneval` holds the reference's facts, its rules and
where koala differs), ``koala eval geneval`` over the benchmark's image folder (resumable) and the scorer of
``koala eval run --benchmark geneval=...``."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..errors import KoalaError
from .clip_score import check_model_dir
from .geneval import COLORS, OBJECT_NAMES, Detection, Rules, judge, keep_detections, read_layout, summarize

SCHEMA = "koala-eval-geneval/1"
MAX_PER_IMAGE = 100  # mmdet's Mask2Former test_cfg max_per_image
BACKGROUND = (153, 153, 153)  # the reference's bgcolor "#999"
TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")


def instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple, max_per_image: int = MAX_PER_IMAGE):
    """mmdet's Mask2Former instance post-processing of one image: ``class_logits`` (Q, C + 1), ``mask_logits``
    (Q, h, w) over the image (without padding); ``size`` (H, W) of the original image. Returns (scores, labels,
    boxes (x0, y0, x1, y1), bool masks (N, H, W)) of the top (query, class) pairs."""
    n_cls = class_logits.shape[-1] - 1
    probs = class_logits.float().softmax(-1)[:, :-1].flatten()
    top_scores, top = probs.topk(min(max_per_image, probs.numel()), sorted=False)
    labels, queries = top % n_cls, top // n_cls
    uniq, inverse = queries.unique(return_inverse=True)  # upsample each chosen query's mask once
    up = torch.nn.functional.interpolate(
        mask_logits[uniq][None].float(), size=tuple(size), mode="bilinear", align_corners=False
    )[0][inverse]
    binary = up > 0
    mask_score = (up.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    boxes = torch.zeros(len(top), 4)
    xs, ys = binary.any(1), binary.any(2)
    for i in range(len(top)):
        x, y = torch.where(xs[i])[0], torch.where(ys[i])[0]
        if len(x) and len(y):
            boxes[i] = torch.tensor([x[0], y[0], x[-1] + 1, y[-1] + 1], dtype=torch.float32)
    return top_scores * mask_score, labels, boxes, binary


class Mask2FormerDetector:
    """Instances per GenEval class from a local transformers Mask2Former COCO-instance checkpoint."""

    def __init__(self, path: str, device: str = "cpu", option: str = "detector"):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        cfg = check_model_dir(
            path, "GenEval detector", "mask2former", "e.g. facebook/mask2former-swin-small-coco-instance", option
        )
        n = len(cfg.get("id2label") or {}) or cfg.get("num_labels")
        if n != len(OBJECT_NAMES):
            raise KoalaError(
                f"GenEval detector {path}: config.json has {n} labels (id2label), GenEval needs COCO's "
                f"{len(OBJECT_NAMES)} instance classes (a COCO-instance checkpoint)",
                option=option,
            )
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(path).to(device).eval()
        try:
            self.processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise KoalaError(
                f"GenEval detector {path}: no image processor (preprocessor_config.json): {str(err)[:200]}",
                option=option,
            ) from None
        self.device = device

    @torch.no_grad()
    def detect(self, image) -> dict[str, list[Detection]]:
        """Every instance of the top 100, by GenEval class name (COCO's order: label i is OBJECT_NAMES[i])."""
        inputs = self.processor(images=image, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device)
        out = self.model(pixel_values=pixel_values)
        masks = out.masks_queries_logits[0]
        h_pad, w_pad = pixel_values.shape[-2:]
        masks = torch.nn.functional.interpolate(masks[None], size=(h_pad, w_pad), mode="bilinear")[0]
        valid = inputs.get("pixel_mask")
        if valid is not None:  # the resized image without the bottom / right padding
            h, w = int(valid[0].any(1).sum()), int(valid[0].any(0).sum())
            masks = masks[:, :h, :w]
        scores, labels, boxes, binary = instances(out.class_queries_logits[0], masks, (image.height, image.width))
        found: dict[str, list[Detection]] = {}
        for s, lab, box, m in zip(scores.tolist(), labels.tolist(), boxes.tolist(), binary.cpu().numpy()):
            found.setdefault(OBJECT_NAMES[lab], []).append(Detection(tuple(box), s, m))
        return found


class ColorClassifier:
    """CLIP zero-shot colour of masked, cropped objects, with the reference's three templates per colour."""

    def __init__(self, path: str, device: str = "cpu", option: str = "clip"):
        from .clip_score import load_clip

        check_model_dir(path, "GenEval CLIP", "clip", "e.g. openai/clip-vit-large-patch14", option)
        self.model, self.processor = load_clip(path, device)
        self.device, self._text = device, {}

    @staticmethod
    def _features(out) -> torch.Tensor:
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def _classifier(self, name: str) -> torch.Tensor:
        if name not in self._text:
            texts = [t.format(c=c, name=name) for c in COLORS for t in TEMPLATES]
            tok = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items()}
            emb = self._features(self.model.get_text_features(**tok)).view(len(COLORS), len(TEMPLATES), -1)
            self._text[name] = torch.nn.functional.normalize(emb.mean(1), dim=-1)
        return self._text[name]

    @torch.no_grad()
    def colors(self, image, name: str, dets: list[Detection]) -> list[str]:
        from PIL import Image

        if not dets:
            return []
        blank = Image.new("RGB", image.size, BACKGROUND)
        crops = []
        for d in dets:
            im = image if d.mask is None else Image.composite(image, blank, Image.fromarray(d.mask))
            crops.append(im.crop(tuple(int(round(v)) for v in d.box)))
        pix = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        img = self._features(self.model.get_image_features(pixel_values=pix))
        return [COLORS[i] for i in (img @ self._classifier(name).T).argmax(1).tolist()]


class GenEval:
    """Judge images for their GenEval metadata with a Mask2Former detector and a CLIP colour classifier."""

    def __init__(
        self,
        detector: str | None,
        clip: str | None,
        device: str = "cpu",
        rules: Rules = Rules(),
        options: tuple[str, str] = ("detector", "clip"),
    ):
        """``options``: the two settings' names in messages (``koala eval run``: geneval_detector, geneval_clip)."""
        if not detector or not clip:
            raise KoalaError(
                "GenEval needs a Mask2Former COCO-instance checkpoint (--detector, e.g. "
                "facebook/mask2former-swin-small-coco-instance) and CLIP ViT-L/14 (--clip, "
                "openai/clip-vit-large-patch14)",
                option=options[0] if not detector else options[1],
            )
        self.clip = ColorClassifier(clip, device, options[1])  # (the smaller load first: a bad CLIP dir fails fast)
        self.detector = Mask2FormerDetector(detector, device, options[0])
        self.rules, self.paths = rules, (os.path.abspath(detector), os.path.abspath(clip))

    def fingerprint(self) -> str:
        """What a cached per-image result depends on besides the image and its metadata."""
        return hashlib.sha1(json.dumps([*self.paths, vars(self.rules)], sort_keys=True).encode()).hexdigest()[:12]

    def evaluate(self, image, metadata: dict) -> dict:
        """{"correct", "reason", "tag", "prompt", "details"} of one PIL image."""
        from PIL import ImageOps

        image = ImageOps.exif_transpose(image).convert("RGB")
        objects = keep_detections(self.detector.detect(image), metadata["tag"], self.rules)
        correct, reason = judge(
            metadata, objects, lambda n, dets: self.clip.colors(image, n, dets), self.rules.position_margin
        )
        details = {k: [[*map(float, d.box), d.score] for d in v] for k, v in objects.items()}
        return {"correct": correct, "reason": reason, "tag": metadata["tag"], "prompt": metadata["prompt"]} | {
            "details": details
        }


def _key(path: str, metadata: dict, fingerprint: str) -> str:
    st = os.stat(path)
    raw = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, metadata, fingerprint], sort_keys=True)
    return hashlib.sha1(raw.encode()).hexdigest()


def score_folder(
    folder: str,
    bench: GenEval,
    results: str | None = None,
    images_per_prompt: int = 4,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """GenEval of the benchmark's image folder; per-image results are appended to ``results`` (default
    FOLDER/koala_geneval.jsonl) as they come, and reused when the image, its metadata and the models are the same."""
    from PIL import Image

    from ..utils.console import progress_bar
    from ..utils.files import append_lines, read_jsonl

    prompts = read_layout(folder, images_per_prompt, limit)
    results = results or os.path.join(folder, "koala_geneval.jsonl")
    cache = {r.get("key"): r for r in read_jsonl(results)}
    fp, rows = bench.fingerprint(), []
    jobs = [(p, path) for p in prompts for path in p.images]
    for p, path in progress_bar(jobs, desc="geneval", disable=not progress):
        key = _key(path, p.metadata, fp)
        if key not in cache:
            try:
                with Image.open(path) as im:
                    im.load()
                    row = bench.evaluate(im, p.metadata)
            except OSError as err:
                raise KoalaError(f"GenEval images: cannot read {path} ({str(err)[:200]})", option="dir") from None
            cache[key] = {"key": key, "file_name": os.path.relpath(path, folder), **row}
            append_lines(results, [json.dumps(cache[key])])
        rows.append(cache[key])
    return {"schema": SCHEMA, "folder": folder, "detector": bench.paths[0], "clip": bench.paths[1]} | (
        summarize(rows) | {"results": results, "per_image": rows}
    )


def markdown(result: dict) -> str:
    from ..utils.console import markdown_table

    rows = [[t, f"{v['score']:.4f}", f"{v['correct']} / {v['n']}"] for t, v in result["tags"].items()]
    rows.append(["overall (mean over tags)", f"{result['overall']:.4f}", f"{result['n_images']} images"])
    return markdown_table(["GenEval tag", "score", "correct images"], rows) + "\n"


class GenEvalScorer:
    """``koala eval run``'s scorer for GenEval's prompts: each image is judged against its prompt's metadata; the
    aggregate is the overall score (mean over tags) and each tag's score."""

    name = "geneval"

    def __init__(self, metadata: list[dict], bench: GenEval):
        self.by_prompt = {m["prompt"]: m for m in metadata}
        if len(self.by_prompt) != len(metadata):
            raise KoalaError("GenEval metadata: two lines share a prompt text", option="benchmark")
        self.bench = bench

    def per_image(self, paths: list[str], prompts: list[str]) -> list[dict]:
        from .folder import open_rgb

        out = []
        for im, p in zip(open_rgb(paths), prompts):
            r = self.bench.evaluate(im, self.by_prompt[p])
            out.append({"correct": int(r["correct"]), "tag": r["tag"], "prompt": p})
        return out

    def aggregate(self, rows: list[dict], styles: list[str]) -> dict:
        s = summarize(rows)
        return {"overall": s["overall"]} | {t: v["score"] for t, v in s["tags"].items()}
