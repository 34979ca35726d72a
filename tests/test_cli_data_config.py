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
