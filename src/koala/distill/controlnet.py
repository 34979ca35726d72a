"""ControlNet KD (``controlnet.*`` in a recipe): train the student's ControlNet, and optionally its U-Net, so that
student U-Net + student ControlNet matches teacher U-Net + teacher ControlNet.

Both pairs see the same noisy latents, timesteps, text conditioning and control image (``batch["control_image"]``:
[B, 3, H, W] in [0, 1] at the image's pixel size, what diffusers' ControlNet pipelines feed ``controlnet_cond``). The
:class:`~koala.distill.step.Distiller` builds a :class:`ControlNetKD` when ``controlnet.teacher`` is set; its
forwards add the ControlNets' residuals to the U-Nets' calls, so the KD step's own terms apply unchanged:

- L_outKD: student (U-Net + ControlNet) output vs teacher (U-Net + ControlNet) output;
- L_featKD: the layer map's feature pairs on the U-Nets (the existing hooks). With ``controlnet.train_unet=false``
  only the decoder stages' pairs (``UP-*``) are kept: the encoder's features do not depend on the ControlNet;
- residual KD (``controlnet.residual_kd``): each student ControlNet residual (its zero-convolution outputs, the
  mapped blocks' features as the U-Net receives them) vs the teacher ControlNet's residual at the slot the layer map
  maps it to (:func:`koala.arch.controlnet.slot_map`), and the mid residuals, with ``kd.feature_loss``;
- L_task, as in KD (``loss.task``).

The student ControlNet is ``controlnet.student`` (a folder from ``koala controlnet transfer``) or the teacher's
transferred through the layer map at the start. It trains in fp32 with the student in the Distiller's optimizer;
each checkpoint holds it as ``controlnet/`` (loadable with :func:`koala.inference.load_controlnet`, or diffusers'
``AutoModel`` with ``trust_remote_code=True`` for a student without a mid block) beside the student's ``unet/``,
and its optimizer state is in ``trainer_state.pt`` with the U-Net's, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

import os

import torch

from ..arch.controlnet import (
    build_controlnet,
    encoder_mismatches,
    init_controlnet_from_teacher,
    residual_slots,
    slot_map,
    student_controlnet_config,
)
from ..errors import KoalaError
from ..formats.controlnet import load_teacher_controlnet, read_controlnet_config
from ..utils.devices import tree_to
from ..utils.files import atomic_write_json, atomic_write_text
from ..utils.weights import ENTRY_BYTES, tensor_bytes
from .items import Prepared

FOLDER = "controlnet"  # the student ControlNet's folder in a checkpoint


def check_control(batch: dict, where: str = "the data") -> None:
    """Refuse a batch without control images when ControlNet KD is on, naming the config keys."""
    if batch.get("control_image") is None:
        raise KoalaError(
            f"controlnet.teacher is set but {where} gives no control images (batch['control_image']); set "
            "data.control=canny (Canny edges of each image) or data.control=NAME (a file <image stem>.NAME.png next "
            "to each image), or remove controlnet.teacher",
            option="data.control",
        )


class ControlNetKD:
    """The two ControlNets of a ControlNet KD run and their forwards (see the module docstring). ``d``: the
    Distiller (its config, layer map, family, frozen parts and accelerator); ``student``: the student U-Net, frozen
    here unless ``controlnet.train_unet``."""

    def __init__(self, d, student: torch.nn.Module):
        self.cfg, self.d, self.family = d.cfg.controlnet, d, d.family
        if not self.family.controlnet_pipeline_class_name:
            raise KoalaError(
                f"controlnet.teacher with a {self.family.label} student: diffusers has no ControlNet for it",
                option="controlnet.teacher",
            )
        if d.acc.num_processes > 1:
            raise KoalaError(
                "controlnet.teacher with several processes: ControlNet KD trains in one process for now; launch one",
                option="controlnet.teacher",
            )
        lmap, dev = d.lmap, d.acc.device
        teacher = load_teacher_controlnet(self.cfg.teacher, lmap.teacher_config, self.family.label, torch.float32)
        self.student = self._student(teacher).to(dev, torch.float32).train()
        self.slots = slot_map(lmap, self.student, teacher)
        self.teacher = teacher.to(dev, d.frozen.weight_dtype).requires_grad_(False).eval()
        if not self.cfg.train_unet:
            student.requires_grad_(False)

    def _student(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """``controlnet.student`` (refused unless its encoder is the student U-Net's), or the teacher's transferred
        through the layer map."""
        lmap, path = self.d.lmap, self.cfg.student
        if path is None:
            model = build_controlnet(student_controlnet_config(dict(teacher.config), lmap.student_config), "meta")
            init_controlnet_from_teacher(teacher, model, lmap, torch.float32)
            return model
        cfg = read_controlnet_config(path)
        bad = encoder_mismatches(cfg, lmap.student_config)
        if bad:
            raise KoalaError(
                f"controlnet.student {path}: its encoder is not the student U-Net's (transfer the teacher's with "
                "koala controlnet transfer TEACHER_CONTROLNET --student STUDENT --out DIR):\n  "
                + "\n  ".join(bad[:8]),
                option="controlnet.student",
            )
        return load_student_weights(build_controlnet(cfg, "cpu"), path, "controlnet.student")

    # ------------------------------------------------------------------ what trains and what is matched
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.student.parameters())

    def pairs(self, pairs: list) -> list:
        """The U-Net feature pairs that train something: all with ``train_unet``, else the decoder's (``UP-*``)."""
        return pairs if self.cfg.train_unet else [p for p in pairs if p.stage.startswith("UP")]

    # ------------------------------------------------------------------ forwards
    def residuals(self, model: torch.nn.Module, p: Prepared, dtype: torch.dtype | None = None) -> dict:
        """``model``'s residuals for ``p`` as the keyword arguments of the U-Net's call."""
        if p.control is None:
            check_control({}, "a micro-batch")
        kw = self.family.model_inputs(p.cond)
        sample, image = p.noisy, p.control
        if dtype is not None:
            sample, image, kw = sample.to(dtype), image.to(dtype), tree_to(kw, dtype=dtype)
        down, mid = model(
            sample,
            p.t,
            controlnet_cond=image,
            conditioning_scale=float(self.cfg.conditioning_scale),
            return_dict=False,
            **kw,
        )
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}

    def teacher_residuals(self, p: Prepared) -> dict:
        with torch.no_grad():
            return self.residuals(self.teacher, p, self.d.frozen.weight_dtype)

    def residual_loss(self, s_res: dict, t_res: dict, loss_fn) -> torch.Tensor:
        """Mean of ``loss_fn`` over the student's residual slots (each vs its mapped teacher slot) and the mid."""
        s_down, t_down = s_res["down_block_additional_residuals"], t_res["down_block_additional_residuals"]
        terms = [loss_fn(s, t_down[k].detach()) for s, k in zip(s_down, self.slots)]
        terms.append(loss_fn(s_res["mid_block_additional_residual"], t_res["mid_block_additional_residual"].detach()))
        return torch.stack(terms).mean()

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str) -> None:
        """The student ControlNet as a diffusers folder (with koala's class file when it has no mid block)."""
        from ..formats.controlnet import add_remote_code

        self.student.save_pretrained(folder, safe_serialization=True)
        if type(self.student).__name__ == "KoalaControlNetModel":
            add_remote_code(folder)
        atomic_write_json(
            os.path.join(folder, "koala_controlnet_kd.json"),
            {
                "teacher_controlnet": os.path.abspath(self.cfg.teacher),
                "initialised_from": os.path.abspath(self.cfg.student) if self.cfg.student else "transferred",
                "train_unet": bool(self.cfg.train_unet),
                "residual_slots": len(residual_slots(self.student)),
                "slot_map": self.slots,
            },
        )
        atomic_write_text(os.path.join(folder, "README.md"), _card(type(self.student).__name__))

    def load(self, checkpoint: str) -> None:
        folder = os.path.join(checkpoint, FOLDER)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise KoalaError(
                f"{checkpoint} has no {FOLDER}/: it was written by a run without controlnet.teacher; resume it "
                "without ControlNet KD, or start ControlNet KD from its student (student.path=.../unet)",
                option="train.resume",
            )
        load_student_weights(self.student, folder, "train.resume")

    def state_bytes(self) -> int:
        return tensor_bytes(self.parameters(), ENTRY_BYTES)


def load_student_weights(model: torch.nn.Module, folder: str, option: str) -> torch.nn.Module:
    """``folder``'s safetensors weights into ``model`` (fp32, strict), refused naming the file when they differ."""
    from safetensors.torch import load_file

    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(path):
        raise KoalaError(f"{folder}: no diffusion_pytorch_model.safetensors", option=option)
    state = {k: v.float() for k, v in load_file(path, device="cpu").items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise KoalaError(f"{path}: the weights do not fit its config: {str(err)[:300]}", option=option) from err
    return model


def _card(class_name: str) -> str:
    from ..formats.controlnet import load_snippet

    load = load_snippet(class_name)
    return "\n".join(
        [
            "# Student ControlNet after ControlNet KD (koala distill)",
            "",
            "Trained by `koala distill` with `controlnet.teacher` so that the student U-Net with this ControlNet "
            "matches the teacher U-Net with the teacher's ControlNet (output KD, feature KD at the layer map's "
            "pairs, residual KD per mapped zero convolution). Use it with the student U-Net of the same checkpoint "
            "(`../unet`). `koala_controlnet_kd.json` records the teacher ControlNet and the slot map.",
            "",
            "```python",
            load,
            "```",
            "",
            "`koala generate STUDENT --controlnet FOLDER --control-image IMG` samples with it.",
            "",
        ]
    )
