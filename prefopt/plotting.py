"""`prefopt plot RUN [RUN ...]`: a run's curves from its metrics.jsonl, several runs overlaid, with matplotlib.

Each method has default panels (its record's, prefopt.methods); `--metric KEY` draws chosen metrics instead, one panel each. Train
records are solid lines, eval records dashed with markers. An online run that logs eval `kl` gets the
over-optimisation frontier too: each reward term's eval score against KL to the reference (Gao et al. 2023),
a reward-model term marked proxy and a function term verifier.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from prefopt.errors import PrefoptError
from prefopt.methods import METHODS, method_of
from prefopt.run.metrics import read_records


def load_run(path: str | Path) -> tuple[str, dict[str, dict[str, tuple[list, list]]], dict]:
    """(method, {split: {metric: (steps, values)}}, recipe) of a run directory."""
    run = Path(path)
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        raise PrefoptError(f"{run} has no metrics.jsonl: give a run directory (a recipe's output_dir)")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").exists() else {}
    series: dict[str, dict[str, tuple[list, list]]] = {"train": {}, "eval": {}}
    for _, record in read_records(metrics):
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                steps, values = series.setdefault(record["split"], {}).setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    return method_of(recipe).name, series, recipe or {}


def _keys(wanted: list[str], available: set[str]) -> list[str]:
    out = []
    for key in wanted:
        if key.endswith("/"):
            out += sorted(k for k in available if k.startswith(key) and (k.count("/") == 1 or k.endswith("/mean")))
        elif key in available:
            out.append(key)
    return out


def plot_runs(runs: list[str | Path], metrics: list[str] | None = None):
    """The figure: the first run's method's default panels (or one per metric), every run overlaid."""
    try:
        import matplotlib
    except ImportError:
        raise PrefoptError("prefopt plot needs matplotlib: pip install 'prefopt[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = [(Path(run), *load_run(run)) for run in runs]
    names = [run.name for run, *_ in loaded]
    if len(set(names)) < len(names):
        names = [str(run) for run, *_ in loaded]
    panels = [(key, [key]) for key in metrics] if metrics else list(METHODS[loaded[0][1]].panels)
    frontier = [(name, series, recipe) for name, (_, method, series, recipe) in zip(names, loaded)
                if METHODS[method].frontier and "kl" in series["eval"]]
    available = {key for _, _, series, _ in loaded for split in series.values() for key in split}
    panels = [(title, keys) for title, keys in panels if _keys(keys, available)]
    if not panels:
        raise PrefoptError(f"none of the metrics asked for is in these runs; they log: {', '.join(sorted(available))}")
    count = len(panels) + bool(frontier)
    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows + 0.4), squeeze=False)
    axes = axes.ravel()
    # read at a glance: one colour per run in every panel (one legend for the figure), one marker per metric of
    # a panel (its own small legend, in grey), train solid, eval dashed
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for ax, (title, keys) in zip(axes, panels):
        shown = _keys(keys, {k for _, _, series, _ in loaded for split in series.values() for k in split})
        for name, (_, _, series, _) in zip(names, loaded):
            for split, line in (("train", "-"), ("eval", "--")):
                for key in _keys(keys, set(series[split])):
                    steps, values = series[split][key]
                    ax.plot(steps, values, label=f"{name} {split}/{key}", color=colour[name], linestyle=line,
                            marker=markers[shown.index(key) % len(markers)], markevery=max(1, len(steps) // 8),
                            markersize=3.5 if split == "eval" else 2.5, linewidth=1.3 if split == "train" else 1.0)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(shown) > 1:  # which marker is which metric
            handles = [plt.Line2D([], [], color="0.35", marker=markers[i % len(markers)], linestyle="", markersize=4)
                       for i in range(len(shown))]
            ax.legend(handles, shown, fontsize=6.5, loc="best", framealpha=0.7)
    if frontier:
        ax = axes[len(panels)]
        for name, series, recipe in frontier:
            kl = series["eval"]["kl"][1]
            for i, term in enumerate(recipe.get("rewards") or []):
                key = f"rewards/{term.get('name')}"
                if key in series["eval"]:
                    kind = "proxy" if term.get("models") else "verifier"
                    ax.plot(kl, series["eval"][key][1], marker=markers[i % len(markers)], color=colour[name],
                            linestyle="-" if kind == "verifier" else ":", label=f"{name} {key} ({kind})")
        ax.set_title("over-optimisation frontier")
        ax.set_xlabel("eval KL to the reference (nats per completion)")
        ax.set_ylabel("eval score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, framealpha=0.7)
    runs_legend = [plt.Line2D([], [], color=colour[name], linewidth=2.5) for name in names]
    split_legend = [plt.Line2D([], [], color="0.35", linestyle="-"), plt.Line2D([], [], color="0.35", linestyle="--")]
    fig.legend(runs_legend + split_legend, names + ["train", "eval"], loc="upper center",
               ncol=min(len(names) + 2, 6), fontsize=9, frameon=False)
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the runs' legend on top
    return fig


def plot_to_file(runs: list[str], out: str | None = None, metrics: list[str] | None = None) -> Path:
    """Draw the runs and write the PNG: `out`, or RUN/plot.png for one run, ./plot.png for several."""
    fig = plot_runs(runs, metrics)
    path = Path(out) if out else (Path(runs[0]) / "plot.png" if len(runs) == 1 else Path("plot.png"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
