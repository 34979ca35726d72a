"""koala quantize: a quantized tiny student loads back (weights equal to in-memory quantization) and generates
through load_pipeline; per-layer drift is small but nonzero; bad input is refused by name with nothing written."""

import copy
import os

import numpy as np
import pytest
import torch

pytest.importorskip("torchao")

from koala.cli import main  # noqa: E402
from koala.errors import KoalaError  # noqa: E402
from koala.inference import generate, load_pipeline, read_png_params, save_images  # noqa: E402
from koala.inference.quantize import (  # noqa: E402
    check_scheme_runs,
    layer_drift,
    quantize_dir,
    quantize_module,
    scheme_of_dir,
)
from koala.utils.weights import tensor_bytes  # noqa: E402

FAST = dict(steps=2, seed=3, progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def student(tiny_pipe_dir, tmp_path_factory):
    """A tiny KOALA-700M student pipeline (koala compress of the tiny teacher)."""
    from koala.compress import compress

    out = str(tmp_path_factory.mktemp("qstudent") / "student")
    compress(tiny_pipe_dir, "koala-700m", out)
    return out


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_quantized_student_loads_back_and_generates(student, tmp_path):
    out = str(tmp_path / "int8")
    res = quantize_dir(student, "int8-dynamic", out, device="cpu", log=lambda *_: None)
    assert res.quantized_layers == len(_linears(load_pipeline(student, device="cpu").pipe.unet)) > 0
    assert res.bytes_after < res.bytes_before
    assert scheme_of_dir(out) == "int8-dynamic"
    assert os.path.isfile(os.path.join(out, "unet", "koala_layer_map.json"))  # sampling defaults travel along

    full = load_pipeline(student, device="cpu")
    loaded = load_pipeline(out, device="cpu")
    assert loaded.quantization == "int8-dynamic" and any("int8-dynamic" in m for m in loaded.modes)
    # what was saved is what in-memory quantization of the same student gives, tensor for tensor
    expected = _linears(quantize_module(copy.deepcopy(full.pipe.unet), "int8-dynamic"))
    for name, mod in _linears(loaded.pipe.unet).items():
        assert torch.equal(mod.weight.qdata, expected[name].weight.qdata), name
        assert torch.equal(mod.weight.scale, expected[name].weight.scale), name

    w = next(iter(_linears(loaded.pipe.unet).values())).weight  # koala bench's weight bytes: int8 data + scales
    assert w.numel() <= tensor_bytes(w) < 2 * w.numel() and tensor_bytes(w.dequantize()) == 4 * w.numel()

    q_img = generate(loaded, ["a red circle"], **FAST)
    fp_img = generate(full, ["a red circle"], **FAST)
    diff = np.abs(np.asarray(q_img.images[0], np.int16) - np.asarray(fp_img.images[0], np.int16))
    assert 0 < diff.mean() < 8  # the same picture, up to quantization noise
    path = save_images(q_img, str(tmp_path / "png"))[0]
    assert read_png_params(path)["quantization"] == "int8-dynamic"


def test_quantized_unet_folder_drops_into_its_base(student, tiny_pipe_dir, tmp_path):
    out = str(tmp_path / "unet-int4")
    quantize_dir(os.path.join(student, "unet"), "int4-weight", out, device="cpu", log=lambda *_: None)
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors", "koala_layer_map.json"]
    loaded = load_pipeline(unet=out, base=tiny_pipe_dir, device="cpu")
    assert loaded.quantization == "int4-weight"
    assert generate(loaded, ["a blue square"], **FAST).images[0].size == (32, 32)


def _tiny_forward(model):
    c = model.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    cond = dict(
        encoder_hidden_states=torch.randn(2, 7, c.cross_attention_dim, generator=gen),
        added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=gen), "time_ids": torch.rand(2, 6)},
    )
    return lambda m: m(x, torch.tensor([500, 20]), **cond).sample


def test_layer_drift_is_small_but_nonzero(tiny_teacher):
    run = _tiny_forward(tiny_teacher)
    drift = {
        s: layer_drift(tiny_teacher, quantize_module(copy.deepcopy(tiny_teacher), s), run)
        for s in ("int8-weight", "int8-dynamic")
    }
    n_linear = len(_linears(tiny_teacher))
    for s, d in drift.items():
        errs = np.array(list(d["layers"].values()))
        assert len(errs) == n_linear, s
        assert (errs > 0).all() and np.median(errs) < 0.02 and errs.max() < 0.1, (s, np.median(errs), errs.max())
        assert 0 < d["output"] < 0.05, (s, d["output"])
    # int8 activations add error on top of int8 weights, layer by layer
    assert np.median(list(drift["int8-dynamic"]["layers"].values())) > np.median(
        list(drift["int8-weight"]["layers"].values())
    )


def test_bad_input_is_refused_by_name_with_nothing_written(student, tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:  # argparse: the choices come from the library
        main(["quantize", student, "--scheme", "int3", "--out", str(out)])
    assert exc.value.code == 2 and "int3" in capsys.readouterr().err
    assert main(["quantize", student, "--scheme", "fp8", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "fp8 cannot run on cpu" in err and "compute capability 8.9" in err and "--device" in err
    with pytest.raises(KoalaError, match="scheme 'int3'"):
        quantize_dir(student, "int3", str(out))
    # a VAE folder: a diffusers model, but no denoiser koala knows
    assert main(["quantize", os.path.join(student, "vae"), "--scheme", "int8-weight", "--out", str(out)]) == 2
    assert "no supported model family" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".o")]


def test_fp8_student_is_refused_at_load_on_cpu(student, tmp_path):
    """An fp8 student (as a GPU writes it) loads only where fp8 runs: on a CPU the loader says why, by name."""
    import json
    import shutil

    with pytest.raises(KoalaError, match="fp8 cannot run on cpu"):
        check_scheme_runs("fp8", "cpu")
    fake = tmp_path / "fp8"
    shutil.copytree(student, fake)
    cfg_path = fake / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {
        "quant_method": "torchao",
        "quant_type": {"default": {"_type": "Float8DynamicActivationFloat8WeightConfig", "_data": {}}},
    }
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(KoalaError, match="fp8 cannot run on cpu"):
        load_pipeline(str(fake), device="cpu")
