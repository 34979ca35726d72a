"""The PixArt DiT family (paper Sec. 4.3, Table 8, App. A.4): presets, compression, conditioning, KD sites,
distillation, caching, generation and benchmarks, on a tiny random PixArt-Σ pipeline built in the session."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

from koala import KoalaError
from koala.arch import LayerMap
from koala.cli import main
from koala.compress import compress
from koala.families import detect_family, family_of, get_family, preset_stats
from koala.testing.tiny import RANDOM, tiny_dit, tiny_unet

PIXART = get_family("pixart")
# Exact transformer parameter counts of the diffusers configs (PixArt-Sigma-XL-2-512-MS; DiT-M = its bottom 14 blocks)
COUNTS = {"pixart-sigma-xl": 610_856_096, "dit-m": 313_278_368}
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.mark.parametrize("name", list(COUNTS))
def test_pixart_presets_exact_counts(name):
    row = preset_stats(name, flops=False)
    assert row["family"] == "pixart" and row["params"] == COUNTS[name]
    assert row["layers"] == {"pixart-sigma-xl": 28, "dit-m": 14}[name]


def test_detection_and_refusals():
    dit_cfg, unet_cfg = dict(tiny_dit().config), dict(tiny_unet().config)
    assert detect_family(dit_cfg).name == "pixart" and detect_family(unet_cfg).name == "sdxl"
    with pytest.raises(KoalaError, match="not a PixArt DiT model.*looks like a SDXL model"):
        PIXART.check(unet_cfg)
    with pytest.raises(KoalaError, match="norm_type is 'ada_norm_zero'"):
        PIXART.check({**dit_cfg, "norm_type": "ada_norm_zero"})
    with pytest.raises(KoalaError, match="preset 'koala-700m' belongs to the SDXL family"):
        PIXART.resolve_spec("koala-700m")
    with pytest.raises(KoalaError, match="between 1 and the teacher's 6 transformer blocks"):
        PIXART.student_config(dit_cfg, "dit-m")  # 14 blocks from a 6-block teacher
    with pytest.raises(KoalaError, match="unknown field"):
        PIXART.resolve_spec({"num_layers": 3, "down_depth": [1]})


@pytest.mark.parametrize("selection,picked", [("bottom", [0, 1, 2]), ("up", [3, 4, 5]), ("interleave", [0, 2, 4])])
def test_every_student_tensor_equals_its_teacher_tensor(selection, picked):
    teacher = tiny_dit(seed=3).eval()
    student, lmap = PIXART.compress(teacher, {"num_layers": 3}, selection)
    t_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, t_state[lmap.teacher_name(name)]), name
    assert torch.equal(student.pos_embed.pos_embed, teacher.pos_embed.pos_embed)  # non-persistent buffer
    assert [e.teacher_layer for e in lmap.of_kind("transformer_layer")] == picked
    assert lmap.stages() == ["B-1", "B-2", "B-3"] and lmap.meta["family"] == "pixart"
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, RANDOM.text_dim)
    out = student(
        x,
        encoder_hidden_states=text,
        timestep=torch.tensor([10, 500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample
    assert out.shape == (2, 8, 16, 16) and torch.isfinite(out).all()  # learned sigma: eps + variance channels


def test_pipeline_compress_writes_a_loadable_pixart_pipeline(tmp_path, tiny_pixart_dir):
    out = tmp_path / "ditm"
    assert main(["compress", "--teacher", tiny_pixart_dir, "--student", '{"num_layers": 3}', "--out", str(out)]) == 0
    assert family_of(str(out)).name == "pixart" and (out / "transformer" / "koala_layer_map.json").is_file()
    pipe = PixArtSigmaPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_layers == 3
    teacher = PixArtTransformer2DModel.from_pretrained(os.path.join(tiny_pixart_dir, "transformer"))
    lmap = LayerMap.load(str(out))
    t_state = teacher.state_dict()
    assert all(torch.equal(t, t_state[lmap.teacher_name(n)]) for n, t in pipe.transformer.state_dict().items())
    # bad input: deeper than the teacher, an SDXL preset, a pipeline without its T5: refused, nothing written
    for student in ('{"num_layers": 9}', "koala-700m"):
        assert (
            main(["compress", "--teacher", tiny_pixart_dir, "--student", student, "--out", str(tmp_path / "x")]) == 2
        )
        assert not (tmp_path / "x").exists()
    broken = tmp_path / "no-t5"
    shutil.copytree(tiny_pixart_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(KoalaError, match="has no text_encoder/; a PixArt DiT pipeline needs"):
        compress(str(broken), "dit-m", str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()


def test_conditioning_equals_the_pipelines_encode_prompt(tiny_pixart_dir):
    parts = PIXART.load_parts(tiny_pixart_dir)
    pipe = PIXART.make_pipeline(
        parts, PixArtTransformer2DModel.from_pretrained(tiny_pixart_dir, subfolder="transformer")
    )
    prompts = ["  A Red CIRCLE ", "a photo of a blue square"]
    with torch.no_grad():
        cond = PIXART.encode_prompts(prompts, parts.tokenizers, parts.text_encoders)
        ref, ref_mask, neg, neg_mask = pipe.encode_prompt(prompts, device="cpu")
        uncond = PIXART.uncond(parts)
    assert cond["prompt_embeds"].shape == (2, 300, RANDOM.text_dim)  # PixArt-Σ: max_sequence_length 300
    assert torch.equal(cond["prompt_embeds"], ref) and torch.equal(cond["prompt_attention_mask"], ref_mask)
    assert torch.equal(uncond["prompt_embeds"][0], neg[0]) and torch.equal(
        uncond["prompt_attention_mask"][0], neg_mask[0]
    )
    assert cond["prompt_attention_mask"].sum(1).tolist()[0] < 10  # the mask marks the few real tokens


def test_alpha_pipeline_uses_its_120_tokens_and_micro_conditions(tiny_pixart_dir, tmp_path):
    alpha = tmp_path / "alpha"
    shutil.copytree(tiny_pixart_dir, alpha)
    index = json.loads((alpha / "model_index.json").read_text())
    (alpha / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    parts = PIXART.load_parts(str(alpha))
    pipe = PIXART.make_pipeline(parts, PixArtTransformer2DModel.from_pretrained(alpha, subfolder="transformer"))
    assert isinstance(pipe, PixArtAlphaPipeline)
    with torch.no_grad():
        cond = PIXART.encode_prompts(["a red circle"], parts.tokenizers, parts.text_encoders)
        ref, ref_mask, _, _ = pipe.encode_prompt("a red circle", device="cpu")
    assert cond["prompt_embeds"].shape[1] == 120 and torch.equal(cond["prompt_embeds"], ref)
    micro = PIXART.micro_conditions(
        {
            "original_size": torch.tensor([[600, 400]]),
            "crop_top_left": torch.tensor([[0, 0]]),
            "target_size": torch.tensor([[512, 256]]),
        }
    )
    assert micro["resolution"].tolist() == [[600.0, 400.0]] and micro["aspect_ratio"].tolist() == [[2.0]]


def test_dit_feature_types_follow_the_layer_map():
    from koala.distill import feature_pairs

    teacher = tiny_dit(seed=0)
    student, lmap = PIXART.compress(teacher, {"num_layers": 3})
    feats = {"SA": "all", "CA": ["B-1"], "FFN": ["B-2..B-3"], "LF": ["last"]}
    pairs = {(p.type, p.stage): (p.student, p.teacher) for p in feature_pairs(lmap, student, teacher, feats)}
    assert pairs[("SA", "B-2")] == ("transformer_blocks.1.attn1", "transformer_blocks.1.attn1")
    assert pairs[("CA", "B-1")] == ("transformer_blocks.0.attn2", "transformer_blocks.0.attn2")
    assert pairs[("LF", "B-3")] == ("transformer_blocks.2", "transformer_blocks.2")
    assert sorted(k for k in pairs if k[0] == "FFN") == [("FFN", "B-2"), ("FFN", "B-3")]
    # kd.layer_selection re-picks the teacher blocks matched (featKD only): "up" matches the top three
    up = feature_pairs(lmap, student, teacher, {"SA": "all"}, selection="up")
    assert [p.teacher for p in up] == [f"transformer_blocks.{k}.attn1" for k in (3, 4, 5)]
    with pytest.raises(KoalaError, match="no Res features there"):
        feature_pairs(lmap, student, teacher, {"Res": ["B-1"]})
    with pytest.raises(KoalaError, match="range 'B-3..B-1'"):
        feature_pairs(lmap, student, teacher, {"SA": ["B-3..B-1"]})


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_distill_featkd_is_zero_for_the_teacher_itself_and_falls(tiny_pixart_dir, tmp_path):
    from koala.distill import load_config
    from koala.distill.trainer import train

    base = [f"teacher.pipeline={tiny_pixart_dir}", "train.progress=false", "train.log_every=1", "validation.every=0"]
    # a student with all 6 teacher blocks is the teacher: every featKD term (Table 8's SA, CA, FFN, LF) and outKD are 0
    same = load_config(
        "tiny-dit",
        base
        + [
            "student.preset={num_layers: 6}",
            "train.max_steps=1",
            "kd.features={SA: all, CA: all, FFN: all, LF: all}",
            f"train.output_dir={tmp_path / 'same'}",
        ],
    )
    res = train(same)
    row = _metrics(tmp_path / "same")[0]
    assert res["feature_pairs"] == 24 and row["loss/feat"] == 0.0 and row["loss/out"] == 0.0 and row["loss/task"] > 0
    # DiT-M style: the bottom 3 blocks, SA matched against the teacher's top 3 (a real gap): featKD falls
    cfg = load_config(
        "tiny-dit",
        base
        + [
            "train.max_steps=30",
            "kd.layer_selection=up",
            "kd.features={SA: all}",
            "loss.task=0.1",
            f"train.output_dir={tmp_path / 'r'}",
        ],
    )
    res = train(cfg)
    feat = [r["loss/feat"] for r in _metrics(tmp_path / "r")]
    assert feat[0] > 0 and np.mean(feat[-5:]) < 0.5 * np.mean(feat[:5])
    ckpt = res["checkpoint"]
    assert PixArtTransformer2DModel.from_pretrained(os.path.join(ckpt, "transformer")).config.num_layers == 3
    assert LayerMap.load(os.path.join(ckpt, "transformer")).meta["family"] == "pixart"


def test_task_loss_uses_the_epsilon_half_only():
    from koala.distill.config import LossConfig
    from koala.distill.losses import kd_losses

    out = torch.randn(2, 8, 4, 4)
    target = out[:, :4].clone()
    w = LossConfig(task=1.0, out=1.0, feat=1.0)
    losses = kd_losses(out, target, out.clone(), [], {}, {}, w, prediction=PIXART.prediction(out, 4))
    assert losses.task == 0 and losses.out == 0
    assert PIXART.prediction(out, 4).shape == (2, 4, 4, 4) and PIXART.prediction(out[:, :4], 4).shape[1] == 4


def test_cache_stores_t5_embeddings_and_mask(tiny_pixart_dir, tmp_path):
    from koala.data import build_cache, encode_batch, make_dataloader

    data = {"type": "synthetic", "num_samples": 4, "size": 40, "random_flip": False, "center_crop": True}
    build_cache(
        data,
        tiny_pixart_dir,
        str(tmp_path / "c"),
        resolution=32,
        batch_size=2,
        shard_size=4,
        latent="mean",
        dtype="fp16",
        progress=False,
    )
    meta = json.loads((tmp_path / "c" / "cache_config.json").read_text())
    assert meta["fingerprint"]["family"] == "pixart"
    assert {"prompt_embeds", "prompt_attention_mask", "resolution", "aspect_ratio"} <= set(meta["tensors"])
    cached = next(
        iter(
            make_dataloader(
                {"type": "cache", "path": str(tmp_path / "c"), "repeat": False, "shuffle": False},
                batch_size=4,
                resolution=32,
            )
        )
    )
    raw = next(iter(make_dataloader({**data, "repeat": False, "shuffle": False}, batch_size=4, resolution=32)))
    ref = encode_batch(raw, PIXART.load_parts(tiny_pixart_dir), latent="mean")
    assert torch.equal(cached["prompt_attention_mask"].float(), ref["prompt_attention_mask"])  # 0/1: exact in fp16
    torch.testing.assert_close(cached["prompt_embeds"].float(), ref["prompt_embeds"], rtol=1e-2, atol=1e-3)


def test_generate_equals_plain_pixart_sigma_pipeline(tiny_pixart_dir, tmp_path):
    from koala.inference import generate, load_pipeline, read_png_params

    out = tmp_path / "ditm"
    compress(tiny_pixart_dir, {"num_layers": 3}, str(out))
    lp = load_pipeline(str(out), device="cpu")
    assert lp.family == "pixart" and type(lp.pipe).__name__ == "PixArtSigmaPipeline"
    ours = generate(lp, "a red circle", negative_prompt="blue", steps=3, cfg=3.5, seed=4, **QUIET).images[0]
    ref = PixArtSigmaPipeline.from_pretrained(out)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = ref(
        "a red circle",
        negative_prompt="blue",
        num_inference_steps=3,
        guidance_scale=3.5,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(4),
        output_type="np",
        clean_caption=False,
        use_resolution_binning=False,
    ).images[0]
    assert ours.size == (32, 32) and np.array_equal(np.asarray(ours), (expected * 255).round().astype("uint8"))
    # the CLI: a student transformer dropped into the teacher pipeline
    assert (
        main(
            [
                "generate",
                "a blue square",
                "--unet",
                str(out / "transformer"),
                "--base",
                tiny_pixart_dir,
                "--steps",
                "1",
                "--out",
                str(tmp_path / "o"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert read_png_params(str(next((tmp_path / "o").glob("*.png"))))["prompt"] == "a blue square"


def test_bench_times_pixart_components():
    from koala.bench import BenchSettings, run_bench

    res = run_bench(
        BenchSettings(
            models=["tiny-pixart-sigma-xl", "tiny-dit-m"],
            resolution=64,
            steps=1,
            device="cpu",
            dtype="fp32",
            components=["text", "unet", "vae"],
            warmup=0,
            repeats=1,
        ),
        log=lambda *_: None,
    )
    a, b = res["models"]
    assert a["denoiser"] == "transformer" and a["params"]["unet"] > b["params"]["unet"]
    assert {"text_encoders", "vae_decode", "end_to_end"} <= set(a["times_ms"])
    assert res["relative"][1]["unet_flops_ratio"] == pytest.approx(2.0, rel=0.05)  # 28 -> 14 blocks


def test_came_optimizer_trains_and_resumes_bit_exact(tiny_pixart_dir, tmp_path):
    """train.optimizer=came (PixArt's optimizer, from came-pytorch) trains, and resume continues bit-exactly."""
    from safetensors.torch import load_file

    from koala.distill import load_config
    from koala.distill.trainer import train

    common = [
        f"teacher.pipeline={tiny_pixart_dir}",
        "train.progress=false",
        "train.log_every=1",
        "validation.every=0",
        "train.optimizer=came",
        "train.weight_decay=0",
        "train.lr=1e-3",
        "train.checkpoint_every=3",
    ]
    full = train(load_config("tiny-dit", common + ["train.max_steps=6", f"train.output_dir={tmp_path / 'a'}"]))
    train(load_config("tiny-dit", common + ["train.max_steps=3", f"train.output_dir={tmp_path / 'b'}"]))
    resumed = train(
        load_config(
            "tiny-dit", common + ["train.max_steps=6", f"train.output_dir={tmp_path / 'b'}", "train.resume=latest"]
        )
    )
    a, b = (
        load_file(os.path.join(r["checkpoint"], "transformer", "diffusion_pytorch_model.safetensors"))
        for r in (full, resumed)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KoalaError, match="came_betas needs 3 numbers"):
        load_config("tiny-dit", ["train.came_betas=[0.9, 0.99]"])


def test_plan_and_train_bench_know_dits():
    """The memory planner (real size, meta device) and the training-step benchmark (tiny) for PixArt -> DiT-M."""
    from koala.bench.plan import plan_memory
    from koala.bench.train import TrainBenchSettings, run_train_bench
    from koala.distill import load_config

    cfg = load_config(
        None,
        [
            "teacher.pipeline=x",
            "student.preset=dit-m",
            "kd.features={SA: all}",
            "train.resolution=512",
            "train.batch_size=2",
        ],
    )
    p = plan_memory(cfg, teacher="pixart-sigma-xl")
    assert p["params"]["student"] == COUNTS["dit-m"] and p["params"]["teacher"] == COUNTS["pixart-sigma-xl"]
    assert p["feature_pairs"] == 14 and p["bytes"]["step_activations_and_grads"] > 0
    r = run_train_bench(
        TrainBenchSettings(
            teacher="tiny-pixart-sigma-xl",
            resolution=64,
            batch=2,
            steps=1,
            warmup=0,
            device="cpu",
            overrides=["student.preset=dit-m", "teacher.dtype=fp32", "kd.features={SA: all}"],
        ),
        log=lambda *_: None,
    )
    assert r["models"]["student"] == "dit-m" and r["times_ms"]["phases_median"]["student_forward"] > 0
