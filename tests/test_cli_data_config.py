"""`koala data stats --config RECIPE` reads a training recipe's data section like the trainer does."""

import json

from PIL import Image

from koala.cli import main


def test_data_stats_accepts_training_recipes(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 60, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a red square number {i}")
    for recipe in ("tiny", "koala-lightning-700m"):
        assert main(["data", "stats", str(folder), "--config", recipe, "--json"]) == 0, recipe
        st = json.loads(capsys.readouterr().out)
        assert st["images"] == 3, recipe


def test_data_stats_config_follows_extends_and_plain_data_files(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 30 + 20 * (i % 2)), (0, i * 60, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a green square number {i}")
    (tmp_path / "mine.yaml").write_text("extends: koala-turbo-700m\ndata: {min_size: 40}\n")  # drops the 30px ones
    (tmp_path / "data.json").write_text('{"min_size": 40}')  # a bare data config, no `data:` section
    for cfg in ("mine.yaml", "data.json"):
        assert main(["data", "stats", str(folder), "--config", str(tmp_path / cfg), "--json"]) == 0, cfg
        st = json.loads(capsys.readouterr().out)
        assert st["images"] == 2 and st["skipped"].get("too_small") == 2, (cfg, st)
