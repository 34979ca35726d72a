"""FID: torchmetrics with a local TorchScript Inception (a tiny one with the standard interface, scripted here) equals
an independent numpy computation of the Frechet distance on the same features; koala eval run reports it per model."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from koala.cli import main
from koala.errors import KoalaError
from koala.eval.fid import fid, load_inception, read_images


class TinyInception(torch.nn.Module):
    """The FID Inception's interface: float images in [0, 255], ``return_features=True`` -> [N, D] features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 5, stride=4)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x / 255.0, size=(64, 64), mode="bilinear", align_corners=False)
        feats = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return feats if return_features else self.head(feats)


def _folder(path, n, seed, hi=256):
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, hi, (40, 40 + 4 * (i % 3), 3), dtype=np.uint8)).save(
            os.path.join(path, f"{i}.png")
        )
    return str(path)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inc") / "inception-tiny.pt")
    torch.jit.script(TinyInception().eval()).save(path)
    return path


def frechet_numpy(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def test_fid_equals_an_independent_frechet_distance(inception, tmp_path):
    gen = _folder(tmp_path / "gen", 40, 1, hi=200)
    ref = _folder(tmp_path / "ref", 40, 2)
    res = fid(gen, ref, inception)
    net = load_inception(inception)
    with torch.no_grad():
        fa = net(torch.stack(read_images(gen)[0])).double().numpy()
        fb = net(torch.stack(read_images(ref)[0])).double().numpy()
    assert res["fid"] == pytest.approx(frechet_numpy(fa, fb), rel=1e-3)
    assert res["fid"] > 1e-3 and res["n_generated"] == res["n_reference"] == 40
    assert fid(ref, ref, inception)["fid"] == pytest.approx(0.0, abs=1e-3)


def test_cli_and_bad_input(inception, tmp_path, capsys):
    gen = _folder(tmp_path / "gen", 6, 1)
    ref = _folder(tmp_path / "ref", 6, 2)
    (tmp_path / "gen" / "broken.png").write_bytes(b"nope")
    assert (
        main(["eval", "fid", gen, "--reference", ref, "--inception", inception, "--json", str(tmp_path / "f.json")])
        == 0
    )
    assert "1 unreadable skipped" in capsys.readouterr().out
    assert json.load(open(tmp_path / "f.json"))["skipped"]["generated"][0]["file_name"] == "broken.png"
    with pytest.raises(KoalaError, match="no such file"):
        fid(gen, ref, str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(KoalaError, match="not a TorchScript file"):
        fid(gen, ref, str(tmp_path / "junk.pt"))
    one = _folder(tmp_path / "one", 1, 3)
    with pytest.raises(KoalaError, match="at least 2"):
        fid(one, ref, inception)


def test_eval_run_reports_fid_per_model_and_caches_it(inception, tiny_pipe_dir, tmp_path, monkeypatch):
    from koala.eval import fid as fid_mod
    from koala.eval import run as ev

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na red square\n")
    ref = _folder(tmp_path / "ref", 8, 4)
    args = (
        [ev.EvalModel("teacher", model=tiny_pipe_dir)],
        ev.read_prompt_set(str(prompts)),
        [],
        str(tmp_path / "out"),
        ev.EvalSettings(steps=1, seeds=(0, 1)),
    )
    res = ev.run_eval(*args, progress=False, fid_reference=ref, inception=inception)
    value = res["models"][0]["scores"]["fid"]["fid"]
    assert value == pytest.approx(fid(str(tmp_path / "out" / "images" / "teacher"), ref, inception)["fid"])
    calls = []
    monkeypatch.setattr(fid_mod, "fid", lambda *a, **k: calls.append(a))
    again = ev.run_eval(*args, progress=False, fid_reference=ref, inception=inception)
    assert calls == [] and again["models"][0]["scores"]["fid"]["fid"] == value
    assert "fid fid" in open(tmp_path / "out" / "results.md").read()
