"""ONNX export (koala export --format onnx) and koala generate --onnx: each graph equals its diffusers / transformers
module on onnxruntime, at other batch sizes and spatial sizes than the export's (the dynamic axes), and the
ONNX pipeline's image equals the torch pipeline's."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from koala.errors import KoalaError  # noqa: E402
from koala.formats.onnx import MANIFEST, export_onnx, rel_error  # noqa: E402

# a small U-Net: one transformer block per attention stage (export time grows with the number of blocks)
SMALL = dict(depth=(1, 1, 1), layers_per_block=1)
WORDS = ["a", "red", "blue", "circle", "square", "photo", "of"]


def _pipe_dir(tmp_path_factory, family):
    from koala.testing.tiny import RANDOM, save_tiny_pipeline

    d = tmp_path_factory.mktemp(f"onnx_{family}") / "pipe"
    save_tiny_pipeline(str(d), dataclasses.replace(RANDOM, **SMALL), seed=0, words=WORDS, family=family)
    return str(d)


@pytest.fixture(scope="module", params=["sdxl", "sd"])
def exported(request, tmp_path_factory):
    """(family, pipeline dir, ONNX dir) per family, exported with the (faster) TorchScript exporter: SDXL through the
    library, SD-1.x through the command line."""
    from koala.cli import main

    src = _pipe_dir(tmp_path_factory, request.param)
    out = str(tmp_path_factory.mktemp(f"onnx_out_{request.param}") / "onnx")
    if request.param == "sdxl":
        export_onnx(src, out, exporter="torchscript", progress=False, log=lambda *_: None)
    else:
        args = ["export", src, "--format", "onnx", "--exporter", "torchscript", "--out", out, "--no-progress"]
        assert main(args) == 0
    return request.param, src, out


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_graphs_equal_diffusers_at_new_batch_and_size(exported):
    """Inputs named as Optimum's export; outputs within 1e-3 relative of diffusers / transformers at a batch and a
    size the export never saw."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family, src, out = exported
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    sdxl = family == "sdxl"
    assert set(manifest["graphs"]) == {"unet", "vae_decoder", "text_encoder"} | ({"text_encoder_2"} if sdxl else set())
    unet = UNet2DConditionModel.from_pretrained(os.path.join(src, "unet")).eval()
    names = ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if sdxl else [])
    sess = _session(os.path.join(out, "unet", "model.onnx"))
    assert [i.name for i in sess.get_inputs()] == names and [o.name for o in sess.get_outputs()] == ["out_sample"]
    assert sess.get_inputs()[0].shape == ["batch", 4, "height", "width"]
    g = torch.Generator().manual_seed(7)
    x = [torch.randn(3, 4, 16, 24, generator=g), torch.tensor([999.0, 10.0, 500.0])]
    x.append(torch.randn(3, 77, unet.config.cross_attention_dim, generator=g))
    added = None
    if sdxl:
        x += [torch.randn(3, 16, generator=g), torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 3)]
        added = {"text_embeds": x[3], "time_ids": x[4]}
    with torch.no_grad():
        ref = unet(x[0], x[1], x[2], added_cond_kwargs=added).sample
    got = sess.run(None, {n: t.numpy() for n, t in zip(names, x)})[0]
    assert got.shape == (3, 4, 16, 24) and rel_error(got, ref) < 1e-3

    vae = AutoencoderKL.from_pretrained(os.path.join(src, "vae")).eval()
    z = torch.randn(3, 4, 6, 10, generator=g)
    with torch.no_grad():
        ref = vae.decode(z).sample
    got = _session(os.path.join(out, "vae_decoder", "model.onnx")).run(None, {"latent_sample": z.numpy()})[0]
    assert got.shape == ref.shape == (3, 3, 12, 20) and rel_error(got, ref) < 1e-3

    for enc, cls in [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)][: 1 + sdxl]:
        model = cls.from_pretrained(os.path.join(src, enc)).eval()
        ids = torch.randint(0, model.config.vocab_size, (3, 77), generator=g)
        with torch.no_grad():
            ref = model(ids, output_hidden_states=True)
        s = _session(os.path.join(out, enc, "model.onnx"))
        got = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"input_ids": ids.numpy()})))
        first = "text_embeds" if enc == "text_encoder_2" else "pooler_output"
        assert rel_error(got[first], getattr(ref, first)) < 1e-3
        assert rel_error(got["hidden_states.1"], ref.hidden_states[1]) < 1e-3
        assert rel_error(got["last_hidden_state"], ref.last_hidden_state) < 1e-3


def test_onnx_pipeline_image_equals_the_torch_pipeline(exported):
    """diffusers' pipeline over the onnxruntime graphs: the same image as the torch pipeline at the same seed."""
    from koala.inference import load_pipeline
    from koala.inference.onnx import load_onnx_pipeline

    family, src, out = exported
    onnx, ref = load_onnx_pipeline(out), load_pipeline(src, device="cpu")
    assert onnx.modes == ["onnxruntime CPUExecutionProvider"] and onnx.scheduler == ref.scheduler
    kw = dict(num_inference_steps=3, guidance_scale=3.5, width=48, height=32, output_type="np")
    images = [
        p.pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(3), **kw).images
        for p in (onnx, ref)
    ]
    assert images[0].shape == (2, 32, 48, 3)
    assert np.abs(images[0] - images[1]).max() < 1e-3
    assert images[1].std() > 0.01  # a real image, not a constant


def test_cli_generate_onnx_writes_pngs_and_refuses_torch_options(exported, tmp_path, capsys):
    from koala.cli import main
    from koala.inference import read_png_params

    family, _, out = exported
    images = tmp_path / "img"
    args = ["generate", "a red circle", "--onnx", out, "--steps", "2", "--out", str(images), "--no-progress"]
    assert main(args) == 0
    pngs = sorted(images.glob("*.png"))
    assert len(pngs) == 1 and read_png_params(str(pngs[0]))["model"] == "onnx (onnx)"
    assert "onnxruntime CPUExecutionProvider" in capsys.readouterr().out
    bad = tmp_path / "bad"
    assert main(["generate", "x", "--onnx", out, "--compile", "--out", str(bad)]) == 2
    assert "--compile" in capsys.readouterr().err and not bad.exists()
    assert main(["generate", "x", "--onnx", str(tmp_path), "--out", str(bad)]) == 2
    assert MANIFEST in capsys.readouterr().err


def test_export_refuses_what_it_cannot_export_and_writes_nothing(exported, tiny_pixart_dir, tmp_path, capsys):
    from koala.cli import main

    family, src, _ = exported
    if family != "sdxl":
        pytest.skip("family-independent")
    out = tmp_path / "o"
    with pytest.raises(KoalaError, match="PixArt.*no ONNX export"):
        export_onnx(tiny_pixart_dir, str(out))
    unknown = tmp_path / "flux"
    unknown.mkdir()
    (unknown / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (unknown / "transformer").mkdir()
    (unknown / "transformer" / "config.json").write_text("{}")
    with pytest.raises(KoalaError, match="'FluxPipeline' is a pipeline koala does not know"):
        export_onnx(str(unknown), str(out))
    with pytest.raises(KoalaError, match="model directory"):
        export_onnx(os.path.join(src, "unet"), str(out))
    with pytest.raises(KoalaError, match="opset 5: choose one from 17"):
        export_onnx(src, str(out), opset=5)
    with pytest.raises(KoalaError, match="exporter 'jit'"):
        export_onnx(src, str(out), exporter="jit")
    assert main(["export", src, "--format", "onnx", "--dtype", "fp16", "--out", str(out)]) == 2
    assert "--dtype" in capsys.readouterr().err
    assert not out.exists() and os.listdir(tmp_path) == ["flux"]


def test_a_failed_check_leaves_nothing(exported, tmp_path, monkeypatch):
    """A graph that onnxruntime computes differently (here: a tolerance no graph meets) is refused by name and the
    output folder is never created."""
    import koala.formats.onnx as mod

    family, src, _ = exported
    if family != "sd":
        pytest.skip("family-independent")
    specs = mod.graph_specs
    monkeypatch.setattr(mod, "graph_specs", lambda *a: [s for s in specs(*a) if s.name == "text_encoder"])
    monkeypatch.setattr(mod, "ONNX_RTOL", -1.0)
    with pytest.raises(KoalaError, match="ONNX check of text_encoder: output .* differs"):
        export_onnx(src, str(tmp_path / "o"), exporter="torchscript", progress=False, log=lambda *_: None)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_dynamo_exporter_unet_equals_diffusers(tmp_path):
    """torch.onnx.export(dynamo=True) (the default exporter): the U-Net graph with its dynamic axes."""
    from koala.formats.onnx import check_graph, export_graph, unet_spec
    from koala.testing.tiny import RANDOM, tiny_unet

    pytest.importorskip("onnxscript")
    unet = tiny_unet(dataclasses.replace(RANDOM, **SMALL), seed=0).eval()
    spec = unet_spec(unet, "unet")
    path = str(tmp_path / "model.onnx")
    export_graph(spec, path, "dynamo")
    cases = check_graph(spec, path)  # the export's shape and another batch / size
    assert [c["inputs"]["sample"][0] for c in cases] == [2, 1] and max(c["max_rel_error"] for c in cases) < 1e-3
    assert _session(path).get_inputs()[0].shape == ["batch", 4, "height", "width"]


def test_external_data_gathered_into_one_file(exported, tmp_path):
    """A graph whose tensors lie in one file each (the TorchScript exporter's layout over 2 GB) is rewritten with one
    model.onnx.data and computes the same."""
    import onnx

    from koala.formats.onnx import one_data_file

    family, _, out = exported
    if family != "sdxl":
        pytest.skip("family-independent")
    src = os.path.join(out, "text_encoder", "model.onnx")
    path = str(tmp_path / "model.onnx")
    onnx.save_model(onnx.load(src), path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(os.listdir(tmp_path)) > 10
    one_data_file(path)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    ids = np.arange(2 * 77).reshape(2, 77) % 20
    want, got = (_session(p).run(None, {"input_ids": ids}) for p in (src, path))
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
