"""Shared fixtures: tiny SDXL- and SD-topology models built in the test session. Never touches the network."""

import os
import subprocess

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# OpenMP threads that wait for work sleep instead of spinning (read when torch loads its OpenMP runtime, so set
# before the import below; inherited by the processes the tests start). On a busy machine, spinning threads of a
# multi-threaded region (the demo scores with all cores) burn the cores the other test worker needs: the demo's
# sampling ran ~10x slower with two spinning threads on 2 shared cores. Only speed changes, never a result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: 1 thread is far faster than 2 on a busy 2-core machine


def pytest_collection_modifyitems(config, items):
    """The ``slow`` tests first (stable order otherwise): the parallel workers (pytest-xdist) then end on short
    tests instead of one worker finishing a long one alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A saved tiny SDXL pipeline (random weights, U-Net depth pattern [1, 2, 10])."""
    from koala.testing.tiny import save_tiny_pipeline

    d = tmp_path_factory.mktemp("tiny_pipe") / "pipe"
    save_tiny_pipeline(str(d), seed=0, words=["a", "red", "blue", "circle", "square", "photo", "of"])
    return str(d)


@pytest.fixture(scope="session")
def tiny_sd_pipe_dir(tmp_path_factory):
    """A saved tiny SD-1.x pipeline (random weights, one CLIP text encoder, four-stage U-Net)."""
    from koala.testing.tiny import save_tiny_pipeline

    d = tmp_path_factory.mktemp("tiny_sd_pipe") / "pipe"
    save_tiny_pipeline(str(d), seed=0, words=["a", "red", "blue", "circle", "square", "photo", "of"], family="sd")
    return str(d)


@pytest.fixture()
def tiny_teacher():
    from koala.testing.tiny import tiny_unet

    return tiny_unet(seed=0).eval()


@pytest.fixture(scope="session")
def tiny_pixart_dir(tmp_path_factory):
    """A saved tiny PixArt-Σ pipeline (random weights: T5 encoder, 6-block DiT with learned sigma)."""
    from koala.testing.tiny import save_tiny_pipeline

    d = tmp_path_factory.mktemp("tiny_pixart") / "pipe"
    save_tiny_pipeline(str(d), seed=0, words=["a", "red", "blue", "circle", "square", "photo", "of"], family="pixart")
    return str(d)


CLIP_WORDS = ["a", "red", "blue", "circle", "square", "photo", "of", "left", "right"]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny random transformers CLIP checkpoint directory (model + processor) that knows CLIP_WORDS."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from koala.testing.tokenizer import build_clip_tokenizer

    d = str(tmp_path_factory.mktemp("clip") / "tiny-clip")
    torch.manual_seed(5)  # a random model whose four scores are all above the clamp at 0 (not a trivial match)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=1000,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    tok = build_clip_tokenizer(os.path.join(d, "tok"), CLIP_WORDS)
    cfg.text_config.vocab_size = len(tok)
    cfg.text_config.bos_token_id, cfg.text_config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    cfg.text_config.pad_token_id = tok.pad_token_id
    CLIPModel(cfg).save_pretrained(d)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    ).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """A tiny random LLaVA saved once per test session (koala data syncap's tests)."""
    from koala.testing.tiny import save_tiny_vlm

    return save_tiny_vlm(str(tmp_path_factory.mktemp("vlm") / "tiny-llava"))


@pytest.fixture(scope="session")
def nsfw_dir(tmp_path_factory):
    """Tiny random ViT classifier whose bias makes 'nsfw' score ~0.99 on any image."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    d = str(tmp_path_factory.mktemp("nsfw"))
    model.save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture
def small_disk(tmp_path):
    """A disk that fills: ``small_disk(size)`` mounts a fresh tmpfs of ``size`` bytes (counted in 4 KiB pages) and
    returns its folder; ``small_disk.resize(folder, size)`` gives it another size. Needs root (CI runs as root):
    skipped otherwise, or where mounting is not allowed."""
    mounts = []

    def mount(size: int) -> str:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounts.append(path)
        return str(path)

    def resize(path: str, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", path], check=True)

    mount.resize = resize
    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)
