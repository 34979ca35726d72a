"""Markdown tables shaped like the paper's Tables 1/6 and a latency/memory plot like its Fig. 7."""

from __future__ import annotations

import os

from ..errors import KoalaError
from ..utils.console import markdown_table
from ..utils.extras import require


def _ms(times: dict, key: str) -> str:
    return f"{times[key]['median']:.1f}" if key in times else "-"


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.2f}" if n else "-"


def _params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def bench_markdown(result: dict) -> str:
    """One row per model: Table 6 columns (resolution, steps, latency, U-Net params, memory) plus the
    Table 1 per-component split (text encoders, U-Net per step and in total, VAE decode) and FLOPs."""
    s, env = result["settings"], result["environment"]
    where = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('threads')} threads)"
    mem_kind = next((m["memory"].get("kind") for m in result["models"] if m["memory"]), "")
    mem_label = "Peak CUDA alloc. (GiB)" if mem_kind == "cuda_max_allocated" else "Peak RSS (GiB)"
    dn = "U-Net" if all(m.get("denoiser", "unet") == "unet" for m in result["models"]) else "Denoiser"
    modes = [
        name
        for key, name in (
            ("channels_last", "channels_last U-Net"),
            ("compile", "compiled U-Net"),
            ("compile_vae", "compiled VAE decoder"),
            ("compile_text", "compiled text encoders"),
            ("vae_tiling", "VAE tiling"),
        )
        if s.get(key)
    ]
    if s.get("compile_mode"):
        modes.append(f"compile mode {s['compile_mode']}")
    if s.get("memory_cap_gib"):
        modes.append(f"memory capped at {s['memory_cap_gib']} GiB")
    lines = [
        f"Device: {where}; dtype {s['dtype']}; batch {s['batch']} ({_cfg_text(result, dn)}); components: "
        f"{', '.join(s['components'])}; warm-up {s['warmup']}, {s['repeats']} rounds "
        f"interleaved, medians; torch {env.get('torch')}" + (f"; {', '.join(modes)}." if modes else "."),
        "",
    ]
    head = ["Model", "Resolution", "Steps", "Latency (s)", "Text Enc. (ms)", f"{dn} / step (ms)", f"{dn} total (ms)"]
    head += ["VAE Dec. (ms)", f"{dn} Param.", "TFLOPs / step", "Weights (GiB)", mem_label, f"Speed-up ({dn})"]
    head += ["FLOPs ratio"]
    rel = {r["name"]: r for r in result.get("relative", [])}
    rows = []
    for m in result["models"]:
        t = m["times_ms"]
        latency = f"{t['end_to_end']['median'] / 1000:.3f}" if "end_to_end" in t else "-"
        r = rel.get(m["name"], {})
        rows.append(
            [
                m["name"],
                f"{s['resolution']}²",
                m.get("steps", s["steps"]),
                latency,
                _ms(t, "text_encoders"),
                _ms(t, "unet_step"),
            ]
            + [_ms(t, "unet_total"), _ms(t, "vae_decode"), _params(m["params"]["unet"])]
            + [f"{m['unet_tflops_per_step']:.3g}", _gib(m.get("weights_bytes")), _gib(m["memory"].get("peak_bytes"))]
            + [f"{r.get('unet_step_speedup', 1.0):.2f}x", f"{r.get('unet_flops_ratio', 1.0):.2f}x"]
        )
    lines.append(markdown_table(head, rows))
    if len(result["models"]) > 1:
        ref = result["models"][0]["name"]
        lines += [
            "",
            f"Speed-up and FLOPs ratio are {ref} / model (higher = the model is cheaper than {ref}). "
            f"Median of same-round {dn} ratios: "
            + ", ".join(f"{r['name']} {r['unet_speedup_paired_median']:.2f}x" for r in result["relative"][1:])
            + ".",
        ]
    if mem_kind == "cpu_peak_rss":
        lines += [
            "Peak RSS is the whole process (every model kept loaded is counted); Weights is the model's own "
            "share (the components benchmarked)."
        ]
    return "\n".join(lines) + "\n"


def _cfg_text(result: dict, dn: str) -> str:
    """The denoiser batch and guidance: one value, or per model when the models sample with different ones."""
    s = result["settings"]
    cfgs = {m["name"]: m.get("cfg", s["cfg"]) for m in result["models"]}
    if len(set(cfgs.values())) == 1:
        cfg = next(iter(cfgs.values()))
        return f"{dn} batch {s['batch'] * (2 if cfg > 1 else 1)}, cfg {cfg}"
    return f"{dn} batch doubled where cfg > 1; cfg per model: " + ", ".join(f"{k} {v}" for k, v in cfgs.items())


def plot(result: dict, path: str) -> str:
    """Two bar charts side by side, latency and peak memory per model (Fig. 7 style)."""
    matplotlib = require("matplotlib", "plots", "plotting benchmark results")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    names = [m["name"] for m in models]
    full = all("end_to_end" in m["times_ms"] for m in models)
    key, label = ("end_to_end", "End-to-end latency (s)") if full else ("unet_step", "U-Net step latency (s)")
    lat = [m["times_ms"][key]["median"] / 1000 for m in models]
    if all(m["memory"].get("kind") == "cuda_max_allocated" for m in models):
        mem = [(m["memory"].get("peak_bytes") or 0) / 2**30 for m in models]
        mem_title = "Peak CUDA memory (GiB)"
    else:  # process RSS counts every loaded model: show each model's weights + its run's peak increase
        mem = [(m.get("weights_bytes", 0) + m["memory"].get("peak_delta_bytes", 0)) / 2**30 for m in models]
        mem_title = "Weights + run peak increase (GiB)"
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(names) + 3), 3.5))
    for ax, vals, title in ((a, lat, label), (b, mem, mem_title)):
        bars = ax.bar(names, vals, color=["#888888"] + ["#3a7d44"] * (len(names) - 1))
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    s = result["settings"]
    steps = sorted({m.get("steps", s["steps"]) for m in models})
    fig.suptitle(
        f"{s['device']} {s['dtype']}, {s['resolution']}², {'/'.join(map(str, steps))} steps, batch {s['batch']}"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_json(path: str) -> dict:
    from ..utils.files import read_json

    data = read_json(path)
    if data.get("schema") != "koala-bench/1":
        raise KoalaError(f"{path}: not a koala bench result (schema {data.get('schema')!r}, expected 'koala-bench/1')")
    return data
