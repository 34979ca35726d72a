"""Shared fixtures: tiny SDXL- and SD-topology models built in the test session. Never touches the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: 1 thread is far faster than 2 on a busy 2-core machine


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
