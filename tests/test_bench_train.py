"""koala bench train: the real KD step timed phase by phase (schema, sanity, MFU), the trainer's fast-path
switches, and torch.compile with feature hooks."""

import json

import pytest
import torch

from koala.bench.train import PHASES, TrainBenchSettings, gpu_peak_tflops, run_train_bench, train_markdown
from koala.errors import KoalaError


def _settings(**kw):
    base = dict(teacher="tiny-sdxl-base", resolution=64, batch=2, steps=3, warmup=1, device="cpu", threads=1)
    return TrainBenchSettings(**{**base, **kw})


def test_bench_train_schema_phases_and_mfu():
    r = run_train_bench(_settings(overrides=["teacher.dtype=fp32"]), log=lambda *_: None)
    json.dumps(r)
    assert r["schema"] == "koala-bench-train/1"
    t = r["times_ms"]
    assert set(t["phases_median"]) == set(PHASES) and len(t["steps"]) == 3
    assert all(v >= 0 for v in t["phases_median"].values())
    for ph in ("teacher_forward", "student_forward", "backward", "optimizer"):
        assert t["phases_median"][ph] > 0
    # phases are consecutive intervals of one step: per step they add up to the step exactly
    for i, total in enumerate(t["steps"]):
        assert sum(t["phases"][p][i] for p in PHASES) == pytest.approx(total, rel=1e-6)
    assert t["phase_sum_median"] == pytest.approx(t["step_median"], rel=0.25)
    assert r["samples_per_s"] == pytest.approx(2 * 1000 / t["step_median"])
    f = r["flops"]
    # KOALA-700M topology keeps fewer transformer layers: the teacher forward costs more than the student's
    assert f["teacher_forward"] > f["student_forward"] > 0
    assert f["per_sample"] == f["teacher_forward"] + 3 * f["student_forward"]
    assert 0 < f["mfu"] < 1 and f["peak_source"].startswith("measured")
    m = r["models"]
    assert m["student"] == "koala-700m" and m["student_params"] < m["teacher_params"] and m["feature_pairs"] > 0
    assert r["memory"]["kind"] == "cpu_peak_rss" and r["memory"]["peak_bytes"] > 0
    assert all(x == x for x in r["losses"]) and len(r["losses"]) == 3
    assert "tiny-sdxl-base -> koala-700m" in train_markdown([r])


def test_bench_train_switches_and_student_preset():
    r = run_train_bench(
        _settings(
            steps=1,
            warmup=0,
            overrides=[
                "student.preset=koala-1b",
                "train.gradient_checkpointing=true",
                "train.fused_optimizer=true",
                "train.channels_last=true",
                "train.attention=math",
                "train.mixed_precision=no",
                "teacher.dtype=bf16",
                "kd.features={SA: all}",
                "train.ema.enabled=false",
            ],
        ),
        log=lambda *_: None,
    )
    sw = r["switches"]
    assert sw["gradient_checkpointing"] and sw["fused_optimizer"] and sw["channels_last"]
    assert sw["attention"] == "math" and sw["teacher_dtype"] == "bf16" and sw["mixed_precision"] == "no"
    assert r["models"]["student"] == "koala-1b" and r["times_ms"]["phases_median"]["ema"] < 5


def test_bench_train_pipeline_dir_encodes_raw_data(tiny_pipe_dir):
    r = run_train_bench(
        _settings(teacher=tiny_pipe_dir, steps=1, warmup=0, resolution=64, overrides=["teacher.dtype=fp32"]),
        log=lambda *_: None,
    )
    assert r["times_ms"]["phases_median"]["data_encode"] > 0 and r["models"]["latent"] == [2, 4, 32, 32]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(teacher="no-such-preset"), "neither a preset"),
        (dict(resolution=100), "multiple of 64"),
        (dict(steps=0), ">= 1"),
        (dict(device="tpu"), "cpu, cuda"),
        (dict(peak_tflops=-1.0), "peak_tflops"),
        (dict(overrides=["train.compile=everything"]), "train.compile"),
        (dict(overrides=["train.compile_scope=layers"]), "train.compile_scope"),
        (dict(overrides=["train.fused_optimizer=true", "train.optimizer=adamw8bit"]), "fused_optimizer"),
    ],
)
def test_bench_train_errors(kw, match):
    with pytest.raises(KoalaError, match=match):
        run_train_bench(_settings(**kw), log=lambda *_: None)


def test_gpu_peak_table():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert gpu_peak_tflops("Some Future GPU") is None


def test_cli_bench_train(tmp_path, capsys):
    from koala.cli import main

    j = tmp_path / "t.json"
    rc = main(
        [
            "bench",
            "train",
            "--teacher",
            "tiny-sdxl-base",
            "--resolution",
            "64",
            "--batch",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--json",
            str(j),
            "train.mixed_precision=no",
            "teacher.dtype=fp32",
        ]
    )
    assert rc == 0 and json.loads(j.read_text())["settings"]["overrides"] == [
        "train.mixed_precision=no",
        "teacher.dtype=fp32",
    ]
    assert "MFU" in capsys.readouterr().out
    assert main(["bench", "train", "--teacher", "nope", "--device", "cpu"]) == 2
    assert "option --teacher" in capsys.readouterr().err


# a small KOALA-style student of the tiny teacher (tracing time grows with the number of blocks)
SMALL_STUDENT = (
    "student.preset={encoder_layers: [1, 1, 1], down_depth: [0, 1, 1], up_depth: [1, 1, 0], mid_block: false}"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "compile_mode,scope,teacher_scope",
    [("student", "full", None), ("both", "blocks", None), ("both", "full", "blocks")],
)
def test_compiled_student_keeps_hooks_and_loss(tiny_pipe_dir, tmp_path, compile_mode, scope, teacher_scope):
    """torch.compile (dynamo + AOT autograd; the aot_eager backend skips code generation so the test stays
    fast) traces the feature hooks into the graph: the compiled student gives the eager student's losses and
    gradients on the same batch, whole-model and regional (each transformer / resnet block compiled, hooks on
    the attention modules inside the blocks), student alone and teacher + student."""
    from accelerate import Accelerator

    from koala.data import make_dataloader
    from koala.distill import load_config
    from koala.distill.step import Distiller, sample_generators

    def build(compile_mode):
        cfg = load_config(
            "tiny",
            [
                f"teacher.pipeline={tiny_pipe_dir}",
                f"train.output_dir={tmp_path / compile_mode}",
                "train.resolution=64",
                "train.batch_size=2",
                "teacher.dtype=fp32",
                f"train.compile={compile_mode}",
                "train.compile_backend=aot_eager",
                f"train.compile_scope={scope}",
                f"train.teacher_compile_scope={teacher_scope or 'null'}",
                SMALL_STUDENT,
            ],
        )
        return cfg, Distiller(cfg, Accelerator(cpu=True))

    cfg, eager = build("none")
    _, compiled = build(compile_mode)
    regional = [
        m for m, sc in ((compiled.plain_student, scope), (compiled.teacher, teacher_scope or scope)) if sc == "blocks"
    ]
    for m in regional:  # regions compiled in place, the models themselves not; hooked modules stay outside
        assert getattr(m, "_compiled_call_impl", None) is None
        resnets = [b for b in m.modules() if type(b).__name__ == "ResnetBlock2D"]
        assert resnets and all(b._compiled_call_impl is not None for b in resnets)
        hooked = [b for b in m.modules() if b._forward_hooks]
        assert hooked and all(
            b._compiled_call_impl is None and hasattr(b.forward, "_torchdynamo_orig_callable")
            for b in hooked
            if type(b).__name__ == "Attention"
        )
    batch = next(iter(make_dataloader(cfg.data, batch_size=2, resolution=64, seed=0, pipeline_dir=tiny_pipe_dir)))
    out = []
    for d in (eager, compiled):
        losses = d.micro_step(d.kd_item(batch, sample_generators(0, 0, 0, 2, 1)))  # forward, losses, backward
        grad = torch.cat([p.grad.flatten() for p in d.plain_student.parameters() if p.grad is not None])
        out.append((losses, grad))
    (le, ge), (lc, gc) = out
    assert len(lc.per_pair) == len(le.per_pair) > 0  # every feature pair was captured under compile
    for k in le.per_pair:
        assert torch.allclose(lc.per_pair[k], le.per_pair[k], rtol=1e-4, atol=1e-6), k
    assert torch.allclose(lc.total, le.total, rtol=1e-5)
    assert torch.allclose(gc, ge, rtol=1e-3, atol=1e-6)
