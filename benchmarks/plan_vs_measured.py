"""The memory planner (`koala plan`) against peaks measured by `koala bench train`: for each result JSON, plan the
same recipe (teacher preset, resolution, batch, overrides) on the meta device and compare with the measured peak.

    python benchmarks/plan_vs_measured.py benchmarks/results/h200/train-*.json [--markdown OUT.md]

`koala bench train` with a preset teacher does not load text encoders or a VAE (its batches are pre-encoded), so
they are left out of the planned total here. torch.compile workspaces are not planned: compiled rows are shown
but expected to differ.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)

    from koala.bench.plan import GIB, plan_memory
    from koala.bench.train import TrainBenchSettings, _config, active_switches

    lines = ["| result | switches | measured peak GiB | planned GiB | planned / measured |", "|---|---|---|---|---|"]
    for path in args.results:
        r = json.load(open(path))
        s = r["settings"]
        settings = TrainBenchSettings(**{k: v for k, v in s.items() if k in TrainBenchSettings.__dataclass_fields__})
        cfg = _config(settings, "unused", preset_mode=True)
        b = plan_memory(cfg, teacher=settings.teacher)["bytes"]
        planned = (b["total"] - b["frozen_encoders_vae"]) / GIB
        measured = r["memory"]["peak_bytes"] / GIB
        sw = ", ".join(f"{k}={v}" for k, v in active_switches(r["switches"]).items())
        lines.append(
            f"| {os.path.basename(path)} | {sw} | {measured:.2f} | {planned:.2f} | {planned / measured:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
