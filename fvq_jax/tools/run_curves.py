"""Reference curves of tokenizer runs: loss, windowed usage and PSNR over steps, as CSV and a plot.

  python -m fvq_jax.tools.run_curves --run=default=workdir/fvq_photos --out=curves/default_run
  python -m fvq_jax.tools.run_curves --run=published=RUN_A --run=restart=RUN_B --out=curves/k4096

Reads each workdir's metrics.jsonl (every logged step; a resumed run's repeated steps: the last
record wins) and eval/final/metrics.json. Writes OUT.csv (one row per run and logged step: step, lr,
loss, pixel_loss, perceptual_loss, quantizer_loss, usage, train_psnr), OUT.json (each run's final
evaluation and config summary) and OUT.png (three panels: loss, windowed usage, PSNR).

train_psnr is the training batch's PSNR from the logged pixel loss: 10 log10(2^2 / MSE) on the
model's [-1, 1] pixel range (what the evaluation's PSNR is on [0, 1]), before any clipping of the
reconstruction; it is a curve to compare runs with, not the held-out PSNR (the plot marks that
at the last step).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIELDS = ("step", "lr", "loss", "pixel_loss", "perceptual_loss", "quantizer_loss", "usage", "train_psnr")


def train_psnr(pixel_loss: float) -> float:
    """PSNR of a [-1, 1] batch from its mean squared error (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / pixel_loss) if pixel_loss > 0 else math.inf


def read_run(workdir: str) -> tuple[list[dict], dict]:
    """(rows of FIELDS, one per logged step in order; the final evaluation, {} before it exists)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: --run takes a tokenizer run's workdir")
    records = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                records[record["step"]] = record
    rows = []
    for step in sorted(records):
        record = records[step]
        row = {k: record[k] for k in FIELDS if k in record}
        row["train_psnr"] = train_psnr(record["pixel_loss"])
        rows.append(row)
    final_path = os.path.join(workdir, "eval", "final", "metrics.json")
    final = json.load(open(final_path)) if os.path.exists(final_path) else {}
    return rows, final


def write_curves(runs: dict[str, str], out: str) -> list[str]:
    """Write out.csv, out.json and out.png for {label: workdir}; returns the paths."""
    data = {label: read_run(workdir) for label, workdir in runs.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("run",) + FIELDS)
        for label, (rows, _) in data.items():
            for row in rows:
                writer.writerow([label] + [_fmt(row.get(k, "")) for k in FIELDS])
    with open(out + ".json", "w") as f:
        json.dump({label: {"workdir": runs[label], "logged_steps": len(rows), "final_evaluation": final}
                   for label, (rows, final) in data.items()}, f, indent=1, sort_keys=True)
    figure = Figure(figsize=(15, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    for i, (label, (rows, final)) in enumerate(data.items()):
        steps = [r["step"] for r in rows]
        color = f"C{i}"
        axes[0].plot(steps, [r["loss"] for r in rows], color=color, linewidth=1, label=label)
        axes[1].plot(steps, [100 * r["usage"] for r in rows], color=color, linewidth=1.2, label=label)
        axes[2].plot(steps, [r["train_psnr"] for r in rows], color=color, linewidth=1, alpha=0.8, label=label)
        if "psnr" in final:
            axes[2].plot([steps[-1]], [final["psnr"]], "o", color=color, markersize=6)
    axes[0].set(title="generator loss", xlabel="step", yscale="log")
    axes[1].set(title="windowed codebook usage", xlabel="step", ylabel="%", ylim=(0, 102))
    axes[2].set(title="PSNR: training batch (line), held-out final (dot)", xlabel="step", ylabel="dB")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(out + ".png")
    return [out + ".csv", out + ".json", out + ".png"]


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def _run_arg(text: str) -> tuple[str, str]:
    label, sep, workdir = text.partition("=")
    if not sep or not label or not workdir:
        raise argparse.ArgumentTypeError(f"--run takes LABEL=WORKDIR, got {text!r}")
    return label, workdir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=_run_arg, action="append", required=True, help="LABEL=WORKDIR (repeatable)")
    parser.add_argument("--out", required=True, help="path prefix: writes OUT.csv, OUT.json, OUT.png")
    args = parser.parse_args(argv)
    runs = dict(args.run)
    if len(runs) != len(args.run):
        parser.error("--run labels must be unique")
    try:
        paths = write_curves(runs, args.out)
    except FileNotFoundError as e:
        parser.error(str(e))
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    main()
