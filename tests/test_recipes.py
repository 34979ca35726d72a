"""Typed distillation config (koala.distill.config), recipe loading (koala.recipes) and the shipped recipes."""

import os
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest

from koala import KoalaError
from koala.distill.config import DistillConfig, TeacherConfig, load_config, resolve_grad_accum
from koala.recipes import dump_recipe, read_recipe, shipped_recipes

PIPE = "teacher.pipeline=x"
REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_recipe():
    cfg = load_config(None, [PIPE])
    assert cfg == DistillConfig(teacher=TeacherConfig(pipeline="x"))
    assert asdict(cfg.kd) == {
        "features": {"SA": "all", "LF": ["first", "last"]},
        "layer_selection": None,
        "feature_loss": "mse",
    }
    assert cfg.data == {"type": "synthetic"} and asdict(cfg.loss) == {"task": 1.0, "out": 1.0, "feat": 1.0}
    t = cfg.train
    assert t.lr == 1e-5 and t.adam_betas == [0.9, 0.999] and asdict(t.ema) == {"enabled": True, "decay": 0.9999}
    assert t.caption_dropout == 0.0 and t.allow_world_size_change is False and t.resume is None
    assert cfg.teacher.family is None and cfg.student.preset == "koala-700m"
    assert type(cfg) is DistillConfig and type(cfg.train.adam_betas) is list  # typed, no OmegaConf containers
    assert cfg.to_dict()["train"]["ema"] == {"enabled": True, "decay": 0.9999}  # plain containers for YAML / JSON


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        "tiny",
        [
            "train.lr=1e-5",
            "train.max_steps=7",
            "train.resume=null",
            "train.ema.enabled=false",
            "validation.prompts=[a, b]",
            "train.cpu_threads=2",
            "data.path=x.csv",
        ],
    )
    t = cfg.train
    assert isinstance(t.lr, float) and t.lr == 1e-5 and t.max_steps == 7 and t.resume is None
    assert t.ema.enabled is False and t.cpu_threads == 2 and cfg.validation.prompts == ["a", "b"]
    assert cfg.data["path"] == "x.csv"  # data is an open section (a mapping koala.data checks)
    assert load_config("tiny", ["train.resume=latest"]).train.resume == "latest"
    assert load_config("tiny", ["train.output_dir=runs/${train.resolution}px"]).train.output_dir == "runs/32px"
    with pytest.raises(KoalaError, match="tiny: data.path: Interpolation key 'train.nope' not found"):
        load_config("tiny", ["data.path=${train.nope}"])
    for override, key in (
        ("train.lr=abc", "train.lr"),
        ("train.grad_accum=1.5", "train.grad_accum"),
        ("train.ema.enabled=maybe", "train.ema.enabled"),
        ("train.fsdp=zero2", "train.fsdp"),
        ("train.compile_scope=layers", "train.compile_scope"),
    ):
        with pytest.raises(KoalaError, match=key):
            load_config("tiny", [override])
    with pytest.raises(KoalaError, match="train.fsdp already shards the optimizer states"):
        load_config("tiny", ["train.fsdp=grad_op", "train.shard_optimizer=true"])
    with pytest.raises(KoalaError, match="train.fsdp works with train.optimizer=adamw"):
        load_config("tiny", ["train.fsdp=full", "train.optimizer=came"])
    with pytest.raises(KoalaError, match="use train.mixed_precision=bf16"):
        load_config("tiny", ["train.fsdp=grad_op", "train.mixed_precision=fp16"])
    for bad in ("novalue", "=3", "a=[1,"):
        with pytest.raises(KoalaError, match="override"):
            load_config("tiny", [bad])


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    (tmp_path / "r.yaml").write_text("extends: tiny\ntrain: {lr: 1e-5, weight_decay: 2E-3}\n")
    assert read_recipe(str(tmp_path / "r.yaml"))["train"]["lr"] == 1e-5  # plain YAML reading, no schema
    t = load_config(str(tmp_path / "r.yaml")).train
    assert t.lr == 1e-5 and t.weight_decay == 2e-3 and isinstance(t.lr, float)


def test_unknown_keys_name_the_file_key_and_closest(tmp_path):
    with pytest.raises(KoalaError, match=r"unknown key 'train.lrr' \(did you mean train.lr\?\)"):
        load_config("tiny", ["train.lrr=1"])
    with pytest.raises(KoalaError, match=r"'train.ema.decy' \(did you mean train.ema.decay\?\)"):
        load_config("tiny", ["train.ema.decy=1"])
    with pytest.raises(KoalaError, match=r"unknown key 'trian' \(did you mean train\?\)"):
        load_config("tiny", ["trian.lr=1"])
    (tmp_path / "typo.yaml").write_text("extends: tiny\nstudent: {presett: koala-1b}\n")
    with pytest.raises(KoalaError, match=r"typo.yaml: unknown key 'student.presett' \(did you mean student.preset"):
        load_config(str(tmp_path / "typo.yaml"))
    (tmp_path / "badtype.yaml").write_text("extends: tiny\ntrain: {batch_size: two}\n")
    with pytest.raises(KoalaError, match=r"badtype.yaml: train.batch_size"):
        load_config(str(tmp_path / "badtype.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(KoalaError, match="list.yaml: a recipe must be a YAML mapping"):
        load_config(str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("train: {lr: [\n")
    with pytest.raises(KoalaError, match="broken.yaml: not valid YAML at line 2"):
        load_config(str(tmp_path / "broken.yaml"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "teacher.make_tiny",
            "true",
            "teacher.make_tiny was removed: create the pipeline once with `koala lab make-tiny",
        ),
        ("kd.normalize", "teacher", "kd.normalize was replaced by kd.feature_loss: mse | mse_teacher_norm | cosine"),
        ("data.caption_dropout", "0.1", "data.caption_dropout moved to train.caption_dropout"),
    ],
)
def test_removed_keys_name_their_replacement(tmp_path, key, value, message):
    with pytest.raises(KoalaError, match=f"override .*{message}"):
        load_config("tiny", [f"{key}={value}"])
    sec, name = key.split(".")
    (tmp_path / "old.yaml").write_text(f"extends: tiny\n{sec}:\n  {name}: {value}\n")
    with pytest.raises(KoalaError, match=f"old.yaml: {message}"):
        load_config(str(tmp_path / "old.yaml"))


def test_extends_chain_merges_and_loops_are_refused(tmp_path, monkeypatch):
    (tmp_path / "base.yaml").write_text("extends: tiny\ntrain: {lr: 2.0e-5}\nkd: {features: {SA: all, CA: all}}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(
        "extends: ../base.yaml\ntrain: {max_steps: 3}\ndata: {num_samples: 4}\n"
    )
    cfg = load_config(str(tmp_path / "sub" / "child.yaml"), ["train.batch_size=1"])
    t = cfg.train
    assert (t.lr, t.max_steps, t.batch_size, t.resolution) == (
        2e-5,
        3,
        1,
        32,
    )  # child, base, override, tiny
    assert cfg.data == {"type": "synthetic", "num_samples": 4} and cfg.kd.features == {
        "SA": "all",
        "CA": "all",
    }
    (tmp_path / "turbo.yaml").write_text("extends: koala-turbo-700m\nstudent: {preset: koala-1b}\n")
    assert load_config(str(tmp_path / "turbo.yaml")).train.resolution == 512  # a shipped parent by name
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    (tmp_path / "self.yaml").write_text("extends: self.yaml\n")
    for name in ("a.yaml", "self.yaml"):
        with pytest.raises(KoalaError, match="'extends' loops"):
            load_config(str(tmp_path / name))
    (tmp_path / "badext.yaml").write_text("extends: [tiny]\n")
    with pytest.raises(KoalaError, match="badext.yaml: 'extends' must be a recipe name or path"):
        load_config(str(tmp_path / "badext.yaml"))
    # ./configs/NAME.yaml in the working directory overrides a shipped recipe of the same name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("teacher: {pipeline: mine}\n")
    assert load_config("tiny").teacher.pipeline == "mine"
    assert load_config("tiny.yaml").train.resolution == 1024


def test_kd_features_are_replaced_as_a_whole(tmp_path):
    (tmp_path / "lf.yaml").write_text("extends: tiny\nkd: {features: {LF: all}}\n")
    assert load_config(str(tmp_path / "lf.yaml")).kd.features == {"LF": "all"}
    assert load_config("bk-baseline").kd.features == {"LF": "all"}
    assert load_config("tiny", ["kd.features={CA: all}"]).kd.features == {"CA": "all"}
    assert load_config("tiny", ["kd={features: {CA: all}}"]).kd.features == {"CA": "all"}
    # a single feature type given as a dotted key edits the mapping
    assert load_config("tiny", ["kd.features.SA=[UP-1]"]).kd.features == {
        "SA": ["UP-1"],
        "LF": ["first", "last"],
    }
    # stage names depend on the family (DW-4 exists for SD-1.x): not checked here
    assert load_config("tiny", ["kd.features={LF: [DW-4]}"]).kd.features == {"LF": ["DW-4"]}
    assert load_config("tiny", ["kd.features={LF: UP-3}"]).kd.features == {"LF": "UP-3"}


def test_shipped_recipes_resolve_by_name_and_match_paper():
    names = shipped_recipes()
    assert set(names) == {
        "tiny",
        "bk-baseline",
        "koala-lightning-700m",
        "koala-lightning-1b",
        "koala-turbo-700m",
        "koala-turbo-1b",
        "pixart-sigma-dit-m",
        "tiny-dit",
        "tiny-fewstep",
        "tiny-dmd",
        "tiny-controlnet",
        "koala-700m-lcm",
        "koala-1b-lcm",
        "koala-700m-dmd",
        "koala-1b-dmd",
        "pixart-sigma-dit-m-lcm",
        "koala-base-1b",
        "table3-ablation",
        "table7-koala-1b",
    }
    for name in names:
        cfg = load_config(name)
        assert type(cfg) is DistillConfig and load_config(f"{name}.yaml") == cfg
    for name, preset, res in (
        ("koala-lightning-700m", "koala-700m", 1024),
        ("koala-lightning-1b", "koala-1b", 1024),
        ("koala-turbo-700m", "koala-700m", 512),
        ("koala-turbo-1b", "koala-1b", 512),
    ):
        cfg = load_config(name)
        t = cfg.train
        assert cfg.student.preset == preset and t.resolution == res
        assert t.lr == 1e-5 and t.max_steps == 500_000 and t.mixed_precision == "fp16"
        assert t.global_batch == 128 and resolve_grad_accum(t, 4) == 4  # 4 GPUs in the paper; 16 on one
        # the paper's settings: AdamW, constant lr, no clipping, no weight decay, no EMA (App. A.2)
        assert t.optimizer == "adamw" and t.max_grad_norm is None and t.weight_decay == 0
        assert not t.ema.enabled
        assert cfg.kd.features == {"SA": "all", "LF": ["DW-1", "UP-3"]} and cfg.kd.feature_loss == "mse"
        assert cfg.teacher.kind == ("lightning" if "lightning" in name else "turbo")
    dit = load_config("pixart-sigma-dit-m")  # App. A.4: DiT-M from PixArt-Σ 512, CAME lr 2e-5, batch 192, fp16
    t = dit.train
    assert asdict(dit.student) == {"path": None, "preset": "dit-m", "layer_selection": "bottom"}
    assert (t.optimizer, t.lr, t.resolution, t.mixed_precision) == ("came", 2e-5, 512, "fp16")
    assert t.batch_size * t.grad_accum * 8 == 192 and dit.kd.features == {"SA": "all"}
    assert load_config("tiny-dit").student.preset == {"num_layers": 3}
    # the paper's experiments, each named after its table (App. A.2)
    ab = load_config("table3-ablation")  # Tables 3 / 10: L_task + L_featKD without L_outKD, 30K, batch 32
    assert ab.loss.out == 0 and ab.train.max_steps == 30_000 and ab.train.global_batch == 32
    assert ab.student.preset == "koala-1b" and ab.teacher.kind == "base"
    ours, bk = load_config("table7-koala-1b"), load_config("bk-baseline")  # Table 7: same setup, 50K
    assert {k: v for k, v in ours.to_dict().items() if k not in ("kd", "train")} == {
        k: v for k, v in bk.to_dict().items() if k not in ("kd", "train")
    }
    assert ours.train.max_steps == bk.train.max_steps == 50_000 and bk.kd.features == {"LF": "all"}
    assert load_config("koala-base-1b").teacher.unet_path is None
    assert load_config("koala-lightning-700m").teacher.unet_path
    assert load_config("koala-turbo-1b").teacher.unet_path is None
    _check_fewstep_recipes()
    tiny = load_config("tiny")
    assert tiny.teacher.pipeline == "runs/tiny-pipeline" and tiny.train.caption_dropout == 0.1
    assert tiny.data == {"type": "synthetic", "num_samples": 16}
    with pytest.raises(KoalaError, match="not found.*koala-lightning-700m.*tiny"):
        load_config("no-such-recipe")


def _check_fewstep_recipes():
    """The real-size step-distillation recipes (issue 28): two stages from a KD'ed student on an SDXL-Base teacher
    at 1024², the papers' settings (LCM: diffusers' SDXL script; DMD2: its SDXL 4-step script)."""
    for size in ("700m", "1b"):
        lcm, dmd = load_config(f"koala-{size}-lcm"), load_config(f"koala-{size}-dmd")
        for cfg in (lcm, dmd):
            assert cfg.teacher.kind == "base" and cfg.teacher.unet_path is None and cfg.train.resolution == 1024
            assert cfg.student.preset == f"koala-{size}" and cfg.student.path.endswith("/unet")
            assert f"koala-base-{size}" in cfg.student.path and cfg.fewstep.teacher == "student"
            assert asdict(cfg.loss) == {"task": 0.0, "out": 0.0, "feat": 0.0} and not cfg.train.ema.enabled
            assert cfg.fewstep.steps == 4 and cfg.validation.guidance_scale == 1.0 and cfg.validation.steps == 4
        f, t = lcm.fewstep, lcm.train
        want = ("lcm", 50, 0.95, "huber", 0.001, 0)  # ddim 50, EMA 0.95, pseudo-Huber c 0.001, all weights
        assert (f.method, f.ddim_steps, f.target_decay, f.distance, f.huber_c, f.lora_rank) == want
        assert 3.0 <= f.guidance_scale <= 15.0 and t.lr == 1e-6 and t.global_batch == 12 and t.weight_decay == 0
        f, t = dmd.fewstep, dmd.train
        want = ("dmd", 8.0, 5, 5e-7, 5e-3, 1e-2)  # guidance 8, TTUR 5, lr 5e-7, GAN 5e-3 / 1e-2
        assert (f.method, f.guidance_scale, f.fake_updates, f.fake_lr, f.gan_weight, f.disc_weight) == want
        want = (0.02, 0.98, 5e-7, 2, 10.0, "bf16")
        assert (f.min_t, f.max_t, t.lr, t.batch_size, t.max_grad_norm, t.mixed_precision) == want
    dit = load_config("pixart-sigma-dit-m-lcm")
    assert dit.fewstep.method == "lcm" and dit.fewstep.lora_rank == 0 and dit.student.preset == "dit-m"
    assert dit.student.path.endswith("/transformer") and dit.train.resolution == 512


def test_print_config_round_trips(tmp_path):
    cfg = load_config("koala-turbo-1b")
    (tmp_path / "dumped.yaml").write_text(dump_recipe(cfg))
    assert load_config(str(tmp_path / "dumped.yaml")) == cfg


def test_config_checks_name_the_field():
    from koala.distill.models import teacher_pipeline

    with pytest.raises(KoalaError, match="teacher.pipeline is required.*teacher.pipeline="):
        teacher_pipeline(load_config(None))  # checked where the models are loaded (plans and --print-config need none)
    for override, field in (
        ("kd.features={XA: all}", "XA"),
        ("kd.features={SA: [1]}", "kd.features.SA"),
        ("kd.features=[SA]", "kd.features must map"),
        ("loss.feat=-1", "loss.feat"),
        ("train.lr=.nan", "train.lr"),
        ("train.mixed_precision=fp8", "mixed_precision must be one of no, fp16, bf16"),
        ("train.optimizer=sgd", "optimizer must be one of adamw, adamw8bit, came"),
        ("teacher.kind=distilled", "teacher.kind must be one of base, turbo, lightning"),
        ("train.global_batch=0", "global_batch"),
        ("train.caption_dropout=2", "caption_dropout"),
        ("kd.layer_selection=top", "layer_selection"),
        ("student.layer_selection=top", "student.layer_selection"),
        ("kd.feature_loss=l1", "kd.feature_loss must be one of mse"),
        ("train.grad_accum=0", "grad_accum"),
        ("train.grad_accum=1.5", "grad_accum"),
        ("data.repeat=false", "data.repeat: false is not supported"),
        ("data.type=folder", "path"),
        ("data.colour=red", "colour"),
    ):
        with pytest.raises(KoalaError, match=field):
            load_config("tiny", [override])


def test_wheel_ships_recipes_and_assets(tmp_path):
    """The built wheel holds the recipes and the shapes teacher, and `load_config('tiny')` works from it
    outside the repository (no ./configs, no source tree)."""
    import shutil

    src = tmp_path / "src-copy"  # build a copy: building in place would write build/ into the shared checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "src", src / "src", ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("koala_diffusion-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "koala/configs/tiny.yaml" in names and "koala/assets/shapes-teacher/model_index.json" in names
    assert {f"koala/configs/{n}.yaml" for n in shipped_recipes()} <= names
    target, empty = tmp_path / "site", tmp_path / "elsewhere"
    empty.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import koala; from koala.distill.config import load_config; "
        "assert koala.__file__.startswith(%r), koala.__file__; "
        "print(load_config('tiny').train.resolution)" % str(target)
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    res = subprocess.run([sys.executable, "-c", code], cwd=empty, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "32"


def test_cli_help_lists_recipes_and_print_config(capsys):
    from koala.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in shipped_recipes())
    assert "extends: NAME_OR_PATH" in text and "mse_teacher_norm" in text and "adamw8bit" in text
    assert main(["distill", "--config", "tiny", "--print-config", "train.max_steps=3", "--resume", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 3" in printed and "resume: latest" in printed
    assert main(["distill", "--config", "tiny", "--print-config", "kd.normalize=teacher"]) == 2
    assert "kd.feature_loss" in capsys.readouterr().err
