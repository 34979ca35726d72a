"""koala app: the comparison behind the button (equal to koala generate), bad input, the CLI's model arguments,
and the page itself in a real headless Chromium (selenium + Debian's chromium / chromium-driver)."""

import os
import shutil
import socket
import time

import numpy as np
import pytest

from koala.app import ModelSpec, Request, compare, load_models, results_json
from koala.errors import KoalaError
from koala.inference import generate, load_pipeline, read_png_params


@pytest.fixture(scope="module")
def student_dir(tiny_pipe_dir, tmp_path_factory):
    from koala.compress import compress

    out = str(tmp_path_factory.mktemp("app") / "student")
    compress(tiny_pipe_dir, "koala-700m", out)
    return out


@pytest.fixture(scope="module")
def slots(tiny_pipe_dir, student_dir):
    specs = [
        ModelSpec("teacher", model=tiny_pipe_dir),
        ModelSpec("student", unet=os.path.join(student_dir, "unet"), base=tiny_pipe_dir, note="untrained"),
    ]
    return load_models(specs, device="cpu", log=lambda *_: None)


def test_compare_equals_koala_generate_per_model(slots, tiny_pipe_dir, student_dir, tmp_path):
    req = Request(prompt="a red circle", seed=5, steps=2, cfg=2.0, images=2)
    results = compare(slots, req, out_dir=str(tmp_path), score=True)
    assert [r.label for r in results] == ["teacher", "student (untrained)"]
    refs = [
        load_pipeline(tiny_pipe_dir, device="cpu"),
        load_pipeline(unet=os.path.join(student_dir, "unet"), base=tiny_pipe_dir, device="cpu"),
    ]
    for r, ref in zip(results, refs):
        want = generate(
            ref, "a red circle", seed=5, steps=2, cfg=2.0, images_per_prompt=2, progress=False, log=lambda *_: None
        )
        assert len(r.images) == len(r.files) == 2
        for got, exp in zip(r.images, want.images):
            assert np.array_equal(np.asarray(got), np.asarray(exp))
        assert [read_png_params(f)["seed"] for f in r.files] == [5, 6]  # the downloads keep the metadata
        assert read_png_params(r.files[0]) == want.params[0]
        assert r.latency_s > 0 and r.peak_gib > 0 and r.params == slots[results.index(r)].params > 0
        assert r.settings["steps"] == 2 and r.settings["scheduler"] == "euler"
        assert len(r.scores) == 2 and set(r.scores[0]) >= {"color", "shape", "binding"}
        assert "latency" in r.summary() and "shapes scorer" in r.summary()
    assert slots[1].params < slots[0].params  # the student is smaller
    assert '"latency_s"' in results_json(results)


def test_random_seed_is_reported_and_shared(slots, tmp_path):
    results = compare(slots, Request(prompt="a blue square", seed=-1, steps=1), out_dir=str(tmp_path))
    seeds = {r.settings["seed"] for r in results}
    assert len(seeds) == 1 and next(iter(seeds)) >= 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(prompt="  "), "prompt is empty"),
        (dict(steps=0), "steps 0"),
        (dict(steps=1000), "steps 1000"),
        (dict(cfg=-1), "guidance scale -1"),
        (dict(width=100), "width 100: must be a multiple of 8"),
        (dict(images=9), "images per prompt 9"),
    ],
)
def test_bad_input_is_a_clear_message(slots, kw, match):
    with pytest.raises(KoalaError, match=match):
        compare(slots, Request(**{"prompt": "a red circle", **kw}))


def test_a_model_that_fails_to_load_is_reported_not_raised(tiny_pipe_dir, tmp_path):
    slots = load_models(
        [ModelSpec("good", model=tiny_pipe_dir), ModelSpec("bad", model=str(tmp_path / "nope"))],
        device="cpu",
        log=lambda *_: None,
    )
    assert slots[0].ok and not slots[1].ok and "could not load" in slots[1].error
    results = compare(slots, Request(prompt="a red circle", steps=1), out_dir=str(tmp_path / "out"))
    assert results[0].images and results[1].error and "bad" in results[1].summary()


def test_cli_model_arguments(tmp_path):
    import argparse

    from koala.cli.app import specs_from_args

    ns = argparse.Namespace(model=["/m/teacher"], unet=["/r/step-1/unet", "/r/step-2/unet"], base=["/m/teacher"])
    specs = specs_from_args(ns)
    assert [s.label for s in specs] == ["teacher", "step-1/unet", "step-2/unet"]
    assert all(s.base == "/m/teacher" for s in specs[1:])
    with pytest.raises(KoalaError, match="give --base once"):
        specs_from_args(argparse.Namespace(model=[], unet=["a", "b", "c"], base=["x", "y"]))
    with pytest.raises(KoalaError, match="--base goes with --unet"):
        specs_from_args(argparse.Namespace(model=["m"], unet=[], base=["x"]))


def test_default_models_are_the_shapes_world(tmp_path, monkeypatch):
    """No model arguments: the packaged shapes teacher plus the koala demo student when one exists, else a freshly
    compressed student labelled untrained."""
    import json

    from koala.app.ui import default_specs

    fresh = default_specs(str(tmp_path / "no-demo"), log=lambda *_: None)
    assert fresh[0].label == "shapes teacher" and os.path.isfile(os.path.join(fresh[0].model, "model_index.json"))
    assert "untrained" in fresh[1].note and os.path.isfile(os.path.join(fresh[1].model, "unet", "config.json"))
    demo = tmp_path / "koala-demo"
    (demo / "unet").mkdir(parents=True)
    (demo / "results.json").write_text(json.dumps({"student": str(demo / "unet")}))
    found = default_specs(str(demo), log=lambda *_: None)
    assert found[1].unet == str(demo / "unet") and found[1].base == fresh[0].model and "koala demo" in found[1].note


def test_app_without_gradio_names_the_extra(monkeypatch, capsys):
    import sys

    from koala.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # what an install without the [app] extra sees
    assert main(["app"]) == 2
    assert "pip install 'koala-diffusion[app]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ real browser ------
def _chromium():
    for browser, driver in (
        ("/usr/bin/chromium", "/usr/bin/chromedriver"),
        (shutil.which("chromium") or "", shutil.which("chromedriver") or ""),
    ):
        if browser and driver and os.path.exists(browser) and os.path.exists(driver):
            return browser, driver
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_page_in_a_real_browser(tiny_pipe_dir, student_dir, tmp_path):
    """Start the app on a free localhost port, type a prompt in headless Chromium, press Generate, wait for one
    image per model with its latency; then a bad input (steps 1000) shows its message. Screenshot: the test
    artifact (KOALA_TEST_ARTIFACTS, default the test's tmp dir)."""
    found = _chromium()
    if found is None:
        if os.environ.get("KOALA_REQUIRE_BROWSER"):
            pytest.fail("chromium / chromedriver not found (apt-get install chromium chromium-driver)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from koala.app.ui import serve

    port = _free_port()
    specs = [
        ModelSpec("teacher", model=tiny_pipe_dir),
        ModelSpec("student", unet=os.path.join(student_dir, "unet"), base=tiny_pipe_dir, note="untrained"),
    ]
    app = serve(specs, port=port, device="cpu", score=True, block=False, log=lambda *_: None)
    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    artifacts = os.environ.get("KOALA_TEST_ARTIFACTS") or str(tmp_path)
    os.makedirs(artifacts, exist_ok=True)
    try:
        driver.set_page_load_timeout(60)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 120, poll_frequency=0.5)  # every wait is bounded in time
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#koala-prompt textarea"))
        prompt.clear()
        prompt.send_keys("a red circle to the left of a blue square")
        steps = driver.find_element(By.CSS_SELECTOR, "#koala-steps input")
        steps.clear()
        steps.send_keys("2")
        driver.find_element(By.CSS_SELECTOR, "#koala-generate").click()

        def done(d):
            stats = [d.find_element(By.CSS_SELECTOR, f"#koala-stats-{i}").text for i in range(2)]
            return stats if all("latency" in s for s in stats) else False

        stats = wait.until(done)
        for i, s in enumerate(stats):
            assert "s / image" in s and "peak memory" in s and "shapes scorer" in s, s
            imgs = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#koala-gallery-{i} img"))
            assert len(imgs) == 1
        assert "untrained" in stats[1]
        assert "Done: seed 0" in driver.find_element(By.ID, "koala-status").text
        driver.save_screenshot(os.path.join(artifacts, "koala-app.png"))
        # the download link serves the PNG with koala generate's metadata
        import io
        import urllib.request

        from PIL import Image

        href = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#koala-files-1 a[href]")).get_attribute("href")
        with urllib.request.urlopen(href, timeout=30) as r, Image.open(io.BytesIO(r.read())) as im:
            assert '"seed": 0' in im.text["parameters"] and im.text["prompt"].startswith("a red circle")

        steps.clear()
        steps.send_keys("1000")
        driver.find_element(By.CSS_SELECTOR, "#koala-generate").click()
        msg = wait.until(
            lambda d: (
                "steps 1000" in d.find_element(By.ID, "koala-status").text
                and d.find_element(By.ID, "koala-status").text
            )
        )
        assert "Error" in msg and "choose 1 to 200" in msg
        driver.save_screenshot(os.path.join(artifacts, "koala-app-error.png"))
    finally:
        driver.quit()
        app.close()
    deadline = time.time() + 10  # the server is down: the port no longer answers
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"the app still listens on port {port} after close()")
