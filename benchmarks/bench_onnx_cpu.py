"""CPU latency, onnxruntime vs torch, in one process (interleaved rounds, medians):

1. the real-size KOALA-700M U-Net with random weights at 512² (latents 64²), batch 1, fp32: exported with
   koala's ONNX export (``koala.formats.onnx``), checked against torch, then one U-Net call timed on each runtime;
2. a tiny SDXL pipeline end to end (``koala.testing.tiny``, 32², 10 steps, cfg 3.5): ``koala generate``'s path
   (``koala.inference.generate``) with the torch pipeline and with ``--onnx`` (``load_onnx_pipeline``).

Usage: python benchmarks/bench_onnx_cpu.py --work /tmp/onnx-bench --json benchmarks/results/onnx.json \
    --markdown benchmarks/results/onnx.md [--exporter dynamo|torchscript] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def interleaved(fns: dict, repeats: int) -> dict:
    """Warm each callable once, then ``repeats`` rounds calling each in turn; per-round seconds."""
    for fn in fns.values():
        fn()
    rounds = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            rounds[k].append(time.perf_counter() - t0)
    return rounds


def summary(rounds: dict) -> dict:
    t, o = rounds["torch"], rounds["onnxruntime"]
    return {
        "torch_s": statistics.median(t),
        "onnxruntime_s": statistics.median(o),
        "speedup_median": statistics.median(t) / statistics.median(o),
        "speedup_per_round": [round(a / b, 3) for a, b in zip(t, o)],
        "rounds": {k: [round(x, 4) for x in v] for k, v in rounds.items()},
    }


def wait_for_memory(gib: float, limit_s: float = 3600) -> None:
    """On a shared machine: wait until ``gib`` GiB are available before building the real-size model."""
    import psutil

    t0 = time.time()
    while psutil.virtual_memory().available < gib * 2**30 and time.time() - t0 < limit_s:
        time.sleep(10)
    print(f"available memory {psutil.virtual_memory().available / 2**30:.1f} GiB", flush=True)


def bench_unet(work: str, exporter: str, repeats: int, min_free_gib: float) -> dict:
    from koala.bench.models import build_bench_model

    wait_for_memory(min_free_gib)
    from koala.formats.onnx import check_graph, cpu_session, export_graph, rel_error, unet_spec

    unet = build_bench_model("koala-700m", components=("unet",)).unet.eval()
    spec = unet_spec(unet, "unet")
    path = os.path.join(work, "koala-700m-unet", "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t0 = time.perf_counter()
    export_graph(spec, path, exporter)
    export_s = time.perf_counter() - t0
    print(f"exported in {export_s:.0f} s (peak RSS {rss_gib():.1f} GiB)", flush=True)
    sess = cpu_session(path)
    check = check_graph(spec, path, sess=sess)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 4, 64, 64, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 2048, generator=g))
    x += (torch.randn(1, 1280, generator=g), torch.tensor([[512.0, 512, 0, 0, 512, 512]]))
    feed = {n: t.numpy() for n, t in zip(spec.inputs, x)}
    with torch.no_grad():
        ref = spec.module(*x)
    err = rel_error(sess.run(None, feed)[0], ref)

    def run_torch():
        with torch.no_grad():
            spec.module(*x)

    rounds = interleaved({"torch": run_torch, "onnxruntime": lambda: sess.run(None, feed)}, repeats)
    size = sum(os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in os.listdir(os.path.dirname(path)))
    return {
        "model": "koala-700m U-Net (random weights)",
        "params": sum(p.numel() for p in unet.parameters()),
        "latents": [1, 4, 64, 64],
        "export_s": round(export_s, 1),
        "onnx_bytes": size,
        "check": check,
        "rel_error_512": err,
        **summary(rounds),
    }


def bench_pipeline(work: str, exporter: str, repeats: int) -> dict:
    from koala.formats.onnx import export_onnx
    from koala.inference import generate, load_pipeline
    from koala.inference.onnx import load_onnx_pipeline
    from koala.testing.tiny import save_tiny_pipeline

    src = os.path.join(work, "tiny-sdxl")
    if not os.path.isdir(src):
        save_tiny_pipeline(src, seed=0, words=["a", "red", "circle"])
    out = os.path.join(work, "tiny-sdxl-onnx")
    export_onnx(src, out, exporter=exporter, overwrite=True, progress=False)
    pipes = {"torch": load_pipeline(src, device="cpu"), "onnxruntime": load_onnx_pipeline(out, device="cpu")}
    fns = {
        k: (lambda p=p: generate(p, ["a red circle"], steps=10, seed=0, progress=False, log=lambda *_: None))
        for k, p in pipes.items()
    }
    return {"model": "tiny SDXL pipeline (koala.testing.tiny RANDOM)", "size": "32x32", "steps": 10, "cfg": 3.5} | (
        summary(interleaved(fns, repeats))
    )


def machine() -> str:
    load = os.getloadavg()[0]
    return (
        f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), no GPU; load average {load:.1f} at the end of the run"
    )


def markdown(res: dict) -> str:
    u = res["unet"]
    lines = [
        "# ONNX: onnxruntime vs torch on CPU",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}; onnxruntime {res['onnxruntime']} (CPUExecutionProvider, intra-op threads = "
        f"torch's); exporter {res['exporter']}. Interleaved rounds (torch, onnxruntime, ...) after one warm-up "
        "each; medians.",
        "",
        "| what | torch (s) | onnxruntime (s) | torch / onnxruntime | per-round ratios |",
        "|---|---|---|---|---|",
    ]
    rows = [("KOALA-700M U-Net, 512², batch 1, fp32", u)]
    rows += [("tiny SDXL pipeline, 32², 10 steps", res["pipeline"])] if "pipeline" in res else []
    for name, r in rows:
        lines.append(
            f"| {name} | {r['torch_s']:.3f} | {r['onnxruntime_s']:.3f} | {r['speedup_median']:.2f}x | "
            f"{r['speedup_per_round']} |"
        )
    lines += [
        "",
        f"KOALA-700M U-Net ({u['params'] / 1e6:.0f}M parameters): export {u['export_s']} s, "
        f"{u['onnx_bytes'] / 2**30:.2f} GiB on disk; onnxruntime vs torch at 512²: max relative error "
        f"{u['rel_error_512']:.1e}; the export check: "
        + ", ".join(f"{c['inputs']['sample']} {c['max_rel_error']:.1e}" for c in u["check"])
        + f". Peak RSS of the run: {res['peak_rss_gib']:.1f} GiB.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="scratch folder (ONNX files, the tiny pipeline)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-free-gib", type=float, default=12, help="wait for this much free memory (shared machine)")
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default torch's)")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the KOALA-700M U-Net")
    args = ap.parse_args()
    import onnxruntime

    os.makedirs(args.work, exist_ok=True)
    res = {"command": "python " + " ".join(sys.argv), "exporter": args.exporter}
    res["onnxruntime"] = onnxruntime.__version__
    if args.threads:
        torch.set_num_threads(args.threads)  # onnxruntime sessions take torch's thread count
    res["unet"] = bench_unet(args.work, args.exporter, args.repeats, args.min_free_gib)
    print(json.dumps(res["unet"]), flush=True)
    if not args.skip_pipeline:
        res["pipeline"] = bench_pipeline(args.work, args.exporter, args.repeats)
    res |= {"machine": machine(), "peak_rss_gib": rss_gib()}
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    with open(args.markdown, "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
