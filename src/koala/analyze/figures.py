"""matplotlib figures of ``koala analyze`` (the ``[plots]`` extra)."""

from __future__ import annotations

from ..utils.extras import require


def _plt():
    matplotlib = require("matplotlib", "plots", "koala analyze figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def params_figure(numbers: dict, path: str) -> str:
    """Stacked bars of parameters per stage (one colour per component), models side by side; FLOPs per stage."""
    plt = _plt()
    models, stages, comps = list(numbers["models"]), numbers["stages"], numbers["components"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(stages) * len(models) / 2 + 6), 4.5))
    width = 0.8 / len(models)
    colours = plt.get_cmap("tab10")
    for m, name in enumerate(models):
        rows = numbers["models"][name]
        xs = [i + (m - (len(models) - 1) / 2) * width for i in range(len(stages))]
        bottom = [0.0] * len(stages)
        for c, comp in enumerate(comps):
            vals = [rows["params"].get(s, {}).get(comp, 0) / 1e6 for s in stages]
            ax1.bar(
                xs,
                vals,
                width,
                bottom=bottom,
                color=colours(c),
                edgecolor="black" if m else "none",
                linewidth=0.4,
                label=comp if m == 0 else None,
            )
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax2.bar(xs, [rows["flops"].get(s, 0) / 1e9 for s in stages], width, label=name)
    for ax, title in ((ax1, "parameters (M) per stage"), (ax2, f"GFLOPs per stage at {numbers['resolution']}²")):
        ax.set_xticks(range(len(stages)), stages, rotation=45 if len(stages) > 10 else 0)
        ax.set_title(title)
    ax1.legend(fontsize=7)
    if len(models) > 1:
        ax2.legend(fontsize=8, title="bars left to right")
    fig.suptitle(" vs ".join(models))
    return _save(plt, fig, path)


def latency_figure(numbers: dict, path: str) -> str:
    plt = _plt()
    ms = {k: v for k, v in numbers["ms"].items() if k != "total"}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ms) + 3), 4))
    ax.bar(list(ms), list(ms.values()))
    ax.set_ylabel("ms (median)")
    ax.set_title(
        f"{numbers['model']}: forward time per stage, {numbers['resolution']}² batch {numbers['batch']} "
        f"({numbers['device']}, {numbers['dtype']}); total {numbers['ms']['total']:.1f} ms",
        fontsize=9,
    )
    ax.tick_params(axis="x", rotation=45 if len(ms) > 10 else 0)
    return _save(plt, fig, path)


def similarity_figure(numbers: dict, path: str) -> str:
    """One heatmap per transformer group (Fig. 11), plus a bar chart of student-vs-teacher cosine per layer."""
    plt = _plt()
    groups = [(k, g) for k, g in numbers["groups"].items() if len(g["layers"]) > 1]
    pairs = numbers.get("student_vs_teacher") or {}
    n = max(len(groups) + (1 if pairs else 0), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    for ax, (key, g) in zip(flat, groups):
        im = ax.imshow(g["matrix"], vmin=0, vmax=1, cmap="viridis")
        step = max(1, len(g["layers"]) // 10)
        ax.set_xticks(range(0, len(g["layers"]), step))
        ax.set_yticks(range(0, len(g["layers"]), step))
        ax.set_title(key, fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if pairs:
        ax = flat[n - 1]
        ax.bar(range(len(pairs)), [p["cosine"] for p in pairs.values()])
        ax.set_ylim(0, 1.05)
        ax.set_title("student vs teacher (mapped layers)", fontsize=8)
        ax.set_xlabel("student transformer layer")
    return _save(plt, fig, path)


def pca_figure(rows: dict, prompt: str, path: str) -> str:
    """Per row (teacher / student): the generated image, then each stage's SA-output PCA as RGB (Fig. 3)."""
    plt = _plt()
    stages = list(dict.fromkeys(s for r in rows.values() for s in r["stages"]))
    fig, axes = plt.subplots(
        len(rows), len(stages) + 1, figsize=(1.9 * (len(stages) + 1), 2.1 * len(rows)), squeeze=False
    )
    for r, (name, row) in enumerate(rows.items()):
        axes[r][0].imshow(row["image"])
        axes[r][0].set_title(f"{name} (t={row['timestep']:.0f})", fontsize=7)
        for c, stage in enumerate(stages, start=1):
            ax = axes[r][c]
            if stage in row["stages"]:
                ax.imshow(row["stages"][stage]["rgb"].numpy(), interpolation="nearest")
                ax.set_title(stage, fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle(prompt, fontsize=8)
    return _save(plt, fig, path)
