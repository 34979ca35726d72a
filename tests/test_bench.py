"""koala bench: real-size architecture configs (on meta), random fill, JSON schema and sanity on tiny models."""

import json

import pytest
import torch

from koala.bench import BenchSettings, bench_markdown, load_json, materialize, plot, run_bench
from koala.bench.models import SDXL_VAE
from koala.errors import KoalaError
from koala.families import get_family
from koala.utils.weights import count_params

CLIP_L_TEXT, CLIP_BIGG_TEXT = get_family("sdxl").real_text_towers


def test_real_size_text_encoders_and_vae_match_table1():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        te = count_params(CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))) + count_params(
            CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT))
        )
        vae = count_params(AutoencoderKL(**SDXL_VAE))
    assert round(te / 1e6) == 818 and round(vae / 1e6) == 84  # Table 1: 817M text encoders, 83M VAE


def test_materialize_fills_weights_and_position_ids():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = dict(
        CLIP_L_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100
    )
    m = materialize(lambda: CLIPTextModel(CLIPTextConfig(**cfg)), "cpu", torch.bfloat16)
    pos = next(b for n, b in m.named_buffers() if n.endswith("position_ids"))
    assert pos.dtype == torch.long and pos.flatten().tolist() == list(range(77))
    w = next(p for n, p in m.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight"))
    assert w.dtype == torch.bfloat16 and 0.01 < w.float().std().item() < 0.03
    assert torch.all(next(p for n, p in m.named_parameters() if n.endswith("final_layer_norm.weight")) == 1)
    out = m(torch.randint(0, 100, (1, 77))).last_hidden_state
    assert torch.isfinite(out.float()).all()


def _tiny(**kw):
    base = dict(
        models=["tiny-sdxl-base", "tiny-koala-700m"],
        resolution=64,
        steps=2,
        device="cpu",
        dtype="fp32",
        warmup=0,
        repeats=2,
    )
    return BenchSettings(**{**base, **kw})


def test_bench_schema_and_sanity(tmp_path):
    r = run_bench(_tiny(), log=lambda *_: None)
    assert r["schema"] == "koala-bench/1" and r["settings"]["resolution"] == 64
    json.dumps(r)  # JSON-ready
    big, small = r["models"]
    for m in (big, small):
        t = m["times_ms"]
        assert set(t) == {"text_encoders", "unet_step", "unet_total", "vae_decode", "end_to_end"}
        assert all(v["median"] > 0 for v in t.values())
        assert len(t["unet_step"]["runs"]) == 2 * 2 and len(t["end_to_end"]["runs"]) == 2
        assert t["end_to_end"]["median"] >= t["unet_total"]["min"]
        assert m["memory"]["kind"] == "cpu_peak_rss" and m["memory"]["peak_bytes"] > 0
        assert set(m["params"]) == {"unet", "text_encoders", "vae", "vae_decoder"}
    rel = {x["name"]: x for x in r["relative"]}["tiny-koala-700m"]
    assert rel["unet_params_ratio"] > 1.5 and rel["unet_flops_ratio"] > 1.5
    assert big["unet_tflops_per_step"] > small["unet_tflops_per_step"] > 0
    table = bench_markdown(r)
    assert table.count("\n| tiny-") == 2 and "U-Net / step (ms)" in table
    png = plot(r, str(tmp_path / "fig7.png"))
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 100


def test_bench_pipeline_dir_unet_only_one_at_a_time(tiny_pipe_dir):
    r = run_bench(
        _tiny(models=[tiny_pipe_dir, "tiny-koala-700m"], components=["unet"], keep_loaded=False, steps=1, cfg=1.0),
        log=lambda *_: None,
    )
    m = r["models"][0]
    assert m["source"].endswith("pipe") and set(m["times_ms"]) == {"unet_step", "unet_total"}
    assert set(m["params"]) == {"unet"}
    assert r["relative"][1]["unet_flops_ratio"] > 1


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(models=["no-such-model"]), "neither a preset"),
        (dict(components=["vae"]), "must include unet"),
        (dict(dtype="fp16"), "fp16"),
        (dict(resolution=100), "multiple of 64"),
        (dict(compile_mode="reduce-overhead"), "compile_mode needs something to compile"),
    ],
)
def test_bench_errors(kw, match):
    with pytest.raises(KoalaError, match=match):
        run_bench(_tiny(**kw), log=lambda *_: None)


def test_bench_compile_switches_compile_each_component_in_place():
    """--compile / --compile-vae / --compile-text compile the U-Net, the VAE decoder and the text encoders in place
    (lazily: nothing is traced until the first run), and the markdown header names them."""
    from koala.bench.models import build_bench_model
    from koala.bench.timing import apply_speed_modes

    m = build_bench_model("tiny-koala-700m")
    apply_speed_modes(m, _tiny(compile=True, compile_vae=True))
    assert m.unet._compiled_call_impl is not None and m.vae.decoder._compiled_call_impl is not None
    assert all(getattr(e, "_compiled_call_impl", None) is None for e in m.text_encoders)  # not asked for
    apply_speed_modes(m, _tiny(compile_text=True))
    assert m.text_encoders and all(e._compiled_call_impl is not None for e in m.text_encoders)
    r = {
        "settings": {**vars(_tiny(compile=True, compile_vae=True, channels_last=True)), "compile_mode": None},
        "environment": {"cpu": "x", "threads": 2, "torch": "t"},
        "models": [],
        "relative": [],
    }
    assert "channels_last U-Net, compiled U-Net, compiled VAE decoder." in bench_markdown(r).splitlines()[0]


def test_cli_bench(tmp_path, capsys):
    from koala.cli import main

    j, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(
        [
            "bench",
            "--models",
            "tiny-sdxl-base,tiny-koala-1b",
            "--resolution",
            "64",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--json",
            str(j),
            "--markdown",
            str(md),
        ]
    )
    assert rc == 0
    r = load_json(str(j))
    assert r["settings"]["components"] == ["unet"]  # CPU default: U-Net only
    assert "tiny-koala-1b" in md.read_text() and "tiny-koala-1b" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(KoalaError, match="schema"):
        load_json(str(bad))


def test_cli_bench_bare_json_prints_the_result_alone(tmp_path, capsys):
    from koala.cli import main

    md = tmp_path / "r.md"
    args = ["bench", "--models", "tiny-koala-700m", "--resolution", "64", "--steps", "1", "--device", "cpu"]
    assert main([*args, "--warmup", "0", "--repeats", "1", "--markdown", str(md), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["schema"] == "koala-bench/1"  # stdout: the JSON alone
    assert f"wrote {md}" in captured.err and md.exists()
