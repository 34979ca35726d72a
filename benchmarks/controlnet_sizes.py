"""Real-size student ControlNets: parameters and residual slots of `koala controlnet transfer`'s output for each
preset, built on the meta device from the families' reference configs (no weights, nothing downloaded).

    python benchmarks/controlnet_sizes.py > benchmarks/results/controlnet-sizes.md
"""

import torch
from diffusers import ControlNetModel

from koala.arch.controlnet import build_controlnet, residual_slots, slot_map, student_controlnet_config
from koala.families import get_family
from koala.utils.weights import count_params

PRESETS = {"sdxl": ["koala-1b", "koala-700m", "bk-sdxl"], "sd": ["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"]}


def main() -> None:
    print("# Student ControlNets at real size (meta device; `python benchmarks/controlnet_sizes.py`)\n")
    print("The teacher ControlNet is `ControlNetModel.from_unet` of the family's reference U-Net (SDXL-Base-1.0,")
    print("SD-v1.5): a full-size ControlNet of the teacher. Parameter counts are exact; no weights are built.\n")
    print("| family | student | class | teacher ControlNet | student ControlNet | residuals | teacher slots kept |")
    print("|---|---|---|---|---|---|---|")
    for name, presets in PRESETS.items():
        fam = get_family(name)
        teacher = fam.build_model(fam.reference_config, "meta")
        with torch.device("meta"):
            t_cn = ControlNetModel.from_unet(teacher, load_weights_from_unet=False)
        for preset in presets:
            student = fam.build_model(fam.student_config(fam.reference_config, preset), "meta")
            lmap = fam.build_layer_map(teacher, student)
            s_cn = build_controlnet(student_controlnet_config(dict(t_cn.config), dict(student.config)), "meta")
            slots = slot_map(lmap, s_cn, t_cn)
            print(
                f"| {name} | {preset} | {type(s_cn).__name__} | {count_params(t_cn) / 1e6:.1f}M | "
                f"{count_params(s_cn) / 1e6:.1f}M | {len(residual_slots(t_cn))} -> {len(slots)} | {slots} |"
            )


if __name__ == "__main__":
    main()
