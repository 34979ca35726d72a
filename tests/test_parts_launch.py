"""`koala eval run` and `koala data syncap` under `accelerate launch` with 2 CPU processes (gloo): each rank does its
share, they meet at a barrier and rank 0 merges; the result is exactly the one-process result (the same PNGs, the
same scores, the same captions file byte for byte)."""

import os
import subprocess
import sys

import pytest

from koala.cli import main

DEADLINE = 300


def _launch(port: int, *args: str, log) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(port), "-m", "koala.cli", *args]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=DEADLINE).returncode
    assert rc == 0, open(log).read()[-3000:]


def _one_thread(fn):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


@pytest.mark.slow
def test_eval_run_on_two_processes_is_the_one_process_run(tiny_pipe_dir, tmp_path):
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na red circle left of a blue square\n")
    args = ["eval", "run", "--model", f"teacher={tiny_pipe_dir}"]
    args += ["--prompts", str(prompts), "--scorers", "shapes", "--seeds", "0,1", "--steps", "2", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _one_thread(lambda: main([*args, "--out", str(one), "--no-progress"])) == 0
    _launch(29571, *args, "--out", str(two), "--no-progress", log=tmp_path / "log.txt")
    for name in ("teacher",):
        pngs = sorted(p.name for p in (one / "images" / name).glob("*.png"))
        assert len(pngs) == 4 and pngs == sorted(p.name for p in (two / "images" / name).glob("*.png"))
        for f in pngs:
            assert (one / "images" / name / f).read_bytes() == (two / "images" / name / f).read_bytes(), f
        parts = sorted(p.name for p in (two / "images" / name).glob("index*.jsonl"))
        assert parts == ["index.rank0-of-2.jsonl", "index.rank1-of-2.jsonl"]  # each rank made half
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    for a, b in zip(ra["models"], rb["models"]):
        assert b["generated_now"] == 4 and b["latency_s"] > 0 and b["peak_gib"] > 0
        for k in ("latency_s", "peak_gib"):
            a.pop(k), b.pop(k)
    assert ra == rb


@pytest.mark.slow
def test_syncap_on_two_processes_is_the_one_process_file(tiny_vlm, tmp_path):
    from koala.data.syncap import caption_source
    from koala.testing.images import write_noise_pngs

    vlm, folder = tiny_vlm, write_noise_pngs(str(tmp_path / "imgs"), 7, seed=1)
    one, two = str(tmp_path / "one.jsonl"), str(tmp_path / "two.jsonl")
    kw = dict(batch_size=2, max_new_tokens=5, progress=False)
    _one_thread(lambda: caption_source({"path": str(folder)}, vlm, one, **kw))
    args = ["data", "syncap", str(folder), "--vlm", vlm, "--out", two, "--batch-size", "2", "--max-new-tokens", "5"]
    _launch(29573, *args, "--no-progress", "--device", "cpu", log=tmp_path / "log.txt")
    assert "merged 2 part(s)" in (tmp_path / "log.txt").read_text()
    assert open(two, "rb").read() == open(one, "rb").read() and len(open(one).readlines()) == 7
    assert sorted(os.listdir(tmp_path)) == sorted(["imgs", "log.txt", "one.jsonl", "two.jsonl"])  # no parts
