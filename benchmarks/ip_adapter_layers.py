"""IP-Adapter layers per real-size student: how many of the teacher's cross-attention layers (``ip_adapter.N``
entries) each preset keeps, and which the transfer drops per stage. Structure only: the models are built on the
meta device from the families' reference configs (SDXL-Base-1.0, SD-1.5), and the IP-Adapter's weights are meta
tensors of the real shapes, so nothing is downloaded or computed.

    python benchmarks/ip_adapter_layers.py --out benchmarks/results/ip-adapter-layers.md
"""

from __future__ import annotations

import argparse

import torch

PRESETS = {"sdxl": ("koala-1b", "koala-700m"), "sd": ("bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny")}


def rows() -> list[str]:
    from koala.families import get_family
    from koala.formats.ip_adapter import IPAdapterFile, check_fits, cross_attention_layers, student_layers

    out = []
    for family, presets in PRESETS.items():
        fam = get_family(family)
        teacher = fam.build_model(dict(fam.reference_config), "meta")
        t_layers = cross_attention_layers(teacher)
        mods = dict(teacher.named_modules())
        layers = {
            2 * k + 1: {p: torch.empty(mods[n].to_k.weight.shape, device="meta") for p in ("to_k_ip", "to_v_ip")}
            for k, n in enumerate(t_layers)
        }
        ipa = IPAdapterFile("meta", "IP-Adapter", {"proj.weight": torch.empty(1, device="meta")}, layers)
        check_fits(ipa, teacher, t_layers, fam.reference_name)
        for preset in presets:
            spec = fam.resolve_spec(preset)
            student = fam.build_model(fam.student_config(dict(teacher.config), spec), "meta")
            lmap = fam.build_layer_map(teacher, student, "bottom")
            _, kept, by_stage = student_layers(ipa, lmap, t_layers, cross_attention_layers(student))
            stages = ", ".join(f"{s} {n}" for s, n in sorted(by_stage.items())) or "none"
            out.append(
                f"| {fam.reference_name} | {preset} | {len(t_layers)} (ip_adapter.1..{2 * len(t_layers) - 1}) | "
                f"{kept} (ip_adapter.1..{2 * kept - 1}) | {sum(by_stage.values())}: {stages} |"
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    args = ap.parse_args()
    head = [
        "| teacher | student | teacher cross-attention layers | kept in the student | dropped, by stage |",
        "|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                "# IP-Adapter layers kept per student\n\nMade by `python benchmarks/ip_adapter_layers.py --out "
                "benchmarks/results/ip-adapter-layers.md` (structure only: meta-device models from the reference "
                "configs; no weights, any machine).\n\n" + text + "\n"
            )


if __name__ == "__main__":
    main()
