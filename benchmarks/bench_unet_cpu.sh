#!/usr/bin/env bash
# Acceptance check on a CPU: U-Net latency of SDXL-Base vs KOALA-700M at 512², one step, fp32, measured side
# by side in one process (interleaved A,B,A,B rounds, medians). Real-size architectures with random weights;
# nothing is downloaded. Needs ~14 GB of free RAM (both U-Nets in fp32); with less, add --one-at-a-time.
# --cfg 1 keeps the U-Net batch at 1 (the ratio does not depend on it) so the run takes minutes, not tens.
# Usage: benchmarks/bench_unet_cpu.sh [extra koala bench options]
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
nice -n 10 koala bench --models sdxl-base,koala-700m --components unet --resolution 512 --steps 1 \
    --device cpu --dtype fp32 --cfg 1 --warmup 1 --repeats "${REPEATS:-5}" \
    --json "$out/cpu-512-unet.json" --markdown "$out/cpu-512-unet.md" --plot "$out/cpu-512-unet.png" "$@"
python - "$out/cpu-512-unet.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rel = {x["name"]: x for x in r["relative"]}["koala-700m"]
ok = rel["unet_step_speedup"] >= 2.5
print(f"SDXL / KOALA-700M U-Net step: {rel['unet_step_speedup']:.2f}x (same-round pairs {rel['unet_speedup_paired_median']:.2f}x) (FLOPs ratio {rel['unet_flops_ratio']:.2f}x) "
      f"-> {'PASS' if ok else 'FAIL'} (>= 2.5)")
sys.exit(0 if ok else 1)
PY
