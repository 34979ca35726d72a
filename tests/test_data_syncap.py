"""koala data syncap: a tiny random LLaVA captions a folder source (greedy, batched), the file resumes without
recaptioning, and syncap_file joins the captions to the source for every synCap mode; the NSFW data filter skips and
counts what a local classifier flags."""

import json
import os

import pytest

from koala.cli import main
from koala.data.records import SamplePreparer
from koala.data.sources import make_source
from koala.data.syncap import DEFAULT_PROMPT, caption_source, chat_prompt, load_vlm, read_syncap_file
from koala.errors import KoalaError
from koala.testing.images import write_noise_pngs


@pytest.fixture()
def folder(tmp_path):
    return write_noise_pngs(str(tmp_path / "imgs"), 5, captions=True)


def test_captions_resume_and_equal_direct_generation(tiny_vlm, folder, tmp_path):
    import torch
    from PIL import Image

    out = str(tmp_path / "syncap.jsonl")
    first = caption_source({"path": folder}, tiny_vlm, out, batch_size=2, max_new_tokens=6, limit=3, progress=False)
    assert first["captioned"] == 3 and len(read_syncap_file(out)) == 3
    again = caption_source({"path": folder}, tiny_vlm, out, batch_size=2, max_new_tokens=6, progress=False)
    assert (again["already"], again["captioned"], again["skipped"]) == (3, 2, 1)  # the broken PNG: skipped, counted
    assert sum(again["skip_reasons"].values()) == 1
    caps = read_syncap_file(out)
    assert sorted(caps) == [f"{i}.png" for i in range(5)] and all(caps.values())
    assert len(open(out).readlines()) == 5  # nothing captioned twice
    # a caption is what the model says greedily to the instruction, decoded after the prompt
    model, proc = load_vlm(tiny_vlm)
    inputs = proc(
        images=[Image.open(os.path.join(folder, "4.png")).convert("RGB")],
        text=[chat_prompt(proc, DEFAULT_PROMPT)],
        return_tensors="pt",
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    direct = proc.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert caps["4.png"] == " ".join(direct.split())


def test_syncap_file_joins_by_key_in_every_mode(tiny_vlm, folder, tmp_path, capsys):
    out = str(tmp_path / "syncap.jsonl")
    assert (
        main(["data", "syncap", folder, "--vlm", tiny_vlm, "--out", out, "--max-new-tokens", "4", "--no-progress"])
        == 0
    )
    assert "5 captioned now" in capsys.readouterr().out
    caps = read_syncap_file(out)
    source = make_source({"path": folder, "type": "folder"})
    rec = source.get(0)
    for mode, expected in (
        ("append", f"photo 0, {caps['0.png']}"),
        ("replace", caps["0.png"]),
        ("original", "photo 0"),
    ):
        from koala.data.config import normalize_data_cfg

        prep = SamplePreparer(normalize_data_cfg({"path": folder, "syncap_file": out, "syncap": mode}))
        assert prep.load(rec)[1] == expected
    assert main(["data", "stats", folder, "--syncap-file", out, "--json"]) == 0
    with_syn = json.loads(capsys.readouterr().out)
    assert main(["data", "stats", folder, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    key = next(k for k in plain if "word" in k and "avg" in k)
    assert with_syn[key] > plain[key] and with_syn["images"] == plain["images"] == 5


def test_bad_vlm_and_missing_file(folder, tmp_path):
    with pytest.raises(KoalaError, match="no config.json"):
        caption_source({"path": folder}, str(tmp_path), str(tmp_path / "o.jsonl"), progress=False)
    with pytest.raises(KoalaError, match="syncap_file"):
        read_syncap_file(str(tmp_path / "missing.jsonl"))


def test_nsfw_data_filter_is_counted_in_stats(folder, nsfw_dir, capsys):
    """nsfw_dir's classifier gives 'nsfw' ~0.993 on any image: threshold 0.5 skips all five, 0.999 none."""
    assert main(["data", "stats", folder, "--nsfw-model", nsfw_dir, "--json"]) == 0
    flagged = json.loads(capsys.readouterr().out)
    assert flagged["images"] == 0 and flagged["skipped"]["nsfw"] == 5 and flagged["skipped_total"] == 6  # + broken
    assert main(["data", "stats", folder, "--nsfw-model", nsfw_dir, "--nsfw-threshold", "0.999", "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert kept["images"] == 5 and "nsfw" not in kept["skipped"]
    from koala.data.config import normalize_data_cfg

    prep = SamplePreparer(normalize_data_cfg({"path": folder, "nsfw_model": nsfw_dir}))
    with pytest.raises(Exception, match="nsfw"):
        prep.probe(make_source({"path": folder, "type": "folder"}).get(0))  # resume skipping decides the same way
    assert main(["data", "stats", folder, "--nsfw-model", nsfw_dir, "--nsfw-label", "porn"]) == 2
    assert "id2label" in capsys.readouterr().err


def test_a_full_disk_stops_syncap_and_the_rerun_resumes(tiny_vlm, folder, small_disk, capsys):
    disk = small_disk(4096)  # one tmpfs page
    out = os.path.join(disk, "syncap.jsonl")
    with open(os.path.join(disk, "ballast"), "wb") as f:  # another writer has taken the disk
        f.write(b"x" * 4096)
    argv = ["data", "syncap", folder, "--vlm", tiny_vlm, "--out", out, "--batch-size", "2", "--max-new-tokens", "6"]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"disk full: writing captions to {out} under {disk} failed (No space left on device)" in err
    assert "the captions written before this batch are kept" in err and "Traceback" not in err
    assert os.path.getsize(out) == 0  # no half line
    os.remove(os.path.join(disk, "ballast"))
    assert main([*argv, "--no-progress"]) == 0
    assert len(read_syncap_file(out)) == 5
