"""Turn a finished sweep of tokenizer runs into a markdown report and a usage-over-training plot.

  python -m fvq_jax.tools.sweep_report --sweep_root=/tmp/fvq_ablation \\
      --out=configs/sweeps/results/ablation_small.md

Reads WORKDIR_ROOT/sweep.json (written by launch/sweep.py), and per run its metrics.jsonl (the
training curves), eval/final/metrics.json (the held-out evaluation) and the config saved in its
checkpoint. Runs are grouped by codebook size, method and LR schedule; the method comes from the
sweep file's `method_of(params)` when it defines one, else from the run name. Writes the markdown
file and, next to it, <name>_usage.png: windowed codebook usage over training steps, one panel
per codebook size, with the learning-rate schedules overlaid.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fvq_jax import config_lib
from fvq_jax.checkpointing import Saved

COLUMNS = (  # (header, key in the row, format)
    ("run", "name", "{}"), ("K", "K", "{}"), ("method", "method", "{}"), ("LR schedule", "schedule", "{}"), ("steps", "num_steps", "{}"),
    ("usage, window (final)", "window_usage", "{:.1%}"), ("usage, window (min of last 30%)", "window_usage_late_min",
                                                          "{:.1%}"),
    ("usage, held-out (exact)", "usage", "{:.1%}"), ("dead codes", "dead_codes", "{:d}"),
    ("effective rank", "effective_rank", "{:.2f}"), ("near-duplicate codes", "near_duplicates", "{:d}"),
    ("bridge positions in use", "bridge_positions_in_use", "{}"),
    ("bridge positions live, window (final)", "window_live_positions", "{}"),
    ("PSNR", "psnr", "{:.2f}"), ("LPIPS", "lpips", "{:.3f}"), ("rFID", "rfid", "{:.1f}"),
    ("wall time", "seconds", "{:.0f} s"),
)


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _method_fn(sweep_path: str | None):
    if sweep_path and os.path.exists(sweep_path):
        return getattr(config_lib.load_file(sweep_path, "sweep_definition"), "method_of", None)
    return None


def load_run(entry: dict, method_of) -> dict[str, Any] | None:
    """One run's curves, final evaluation and config; None when it has not finished."""
    workdir = entry["workdir"]
    final_path = os.path.join(workdir, "eval", "final", "metrics.json")
    if not os.path.exists(final_path):
        return None
    final = json.load(open(final_path))
    curves = {}
    for record in _read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        curves[record["step"]] = record  # a resumed run re-logs steps: the last record wins
    steps = sorted(curves)
    config = Saved(workdir).config()
    usage = np.array([curves[s]["usage"] for s in steps])
    late = usage[int(0.7 * len(usage)):]
    return {
        "name": entry["name"], "config": config, "steps": steps, "usage_curve": usage,
        "lr_curve": np.array([curves[s]["lr"] for s in steps]),
        "K": config["quantizer"]["codebook_size"], "schedule": config["optim"]["schedule"],
        "method": method_of(entry["params"]) if method_of else entry["name"],
        "window_usage": float(usage[-1]), "window_usage_late_min": float(late.min()),
        **({"seconds": entry["seconds"]} if entry.get("seconds") is not None else {}),
        "total_steps": int(config["train"]["num_steps"]),
        **{k: final[k] for k in ("usage", "assignments", "dead_codes", "effective_rank", "near_duplicates",
                                 "psnr", "lpips", "rfid") if k in final},
        **({"bridge_positions_in_use": f"{final['bridge_positions_used']}/{final['bridge_positions']}"}
           if "bridge_positions" in final else {}),
        **window_positions(curves[steps[-1]]),
    }


def window_positions(record: dict) -> dict[str, str]:
    """The live in-patch positions of a VQBridge in a logged record's usage window, as "live/p^2"
    (empty for runs without a bridge, or logged before the trainer reported them)."""
    shares = [k for k in record if k.startswith("bridge_position_share/")]
    if "bridge_live_positions" not in record:
        return {}
    return {"window_live_positions": f"{int(record['bridge_live_positions'])}/{len(shares)}"}


def markdown_table(rows: list[dict]) -> str:
    columns = [c for c in COLUMNS if any(c[1] in r for r in rows)]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [fmt.format(r[key]) if key in r else "-" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def usage_plot(rows: list[dict], path: str) -> None:
    """One panel per (codebook size, run length), so that a longer probe does not squeeze the rest."""
    panels = sorted({(r["K"], r["total_steps"]) for r in rows})
    several_lengths = len({steps for _, steps in panels}) > 1
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    figure = Figure(figsize=(max(5 * len(panels), 8), 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (k, total_steps) in zip(axes, panels):
        lr_axis = ax.twinx()
        drawn = set()
        for r in (r for r in rows if (r["K"], r["total_steps"]) == (k, total_steps)):
            style = "-" if r["schedule"] != "const" else "--"
            ax.plot(r["steps"], 100 * r["usage_curve"], style, color=colors[r["method"]],
                    label=f"{r['method']} ({r['schedule']})")
            if r["schedule"] not in drawn:
                drawn.add(r["schedule"])
                lr_axis.plot(r["steps"], r["lr_curve"] / r["lr_curve"].max(), style, color="0.6", linewidth=1)
        title = f"K = {k:,}" + (f", {total_steps:,} steps" if several_lengths else "")
        ax.set(title=title, xlabel="step", ylabel="windowed usage (%)", ylim=(0, 102))
        lr_axis.set(ylabel="LR / max LR (grey)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    labels = {}  # one legend for all panels, under them
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    figure.legend(list(labels.values()), list(labels), loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    figure.tight_layout(rect=(0, 0.06 * ((len(labels) + 5) // 6), 1, 1))
    figure.savefig(path)


def _steps_text(rows: list[dict]) -> str:
    steps = sorted({r["total_steps"] for r in rows})
    return f"{steps[0]} steps" if len(steps) == 1 else f"{' / '.join(map(str, steps))} steps (see the table)"


def held_out_note(rows: list[dict]) -> str:
    """What exact held-out usage can reach: T tokens hit at most T codes, and uniform use of all K
    codes would hit 1 - (1 - 1/K)^T of them in expectation."""
    if not all("assignments" in r for r in rows):
        return ""
    tokens = {r["K"]: int(r["assignments"]) for r in rows}
    ceilings = ", ".join(f"K = {k:,}: {1 - (1 - 1 / k) ** t:.1%}" for k, t in sorted(tokens.items()))
    return (f"Held-out exact usage counts the codes that the held-out images' tokens "
            f"({', '.join(f'{t:,}' for t in sorted(set(tokens.values())))}) hit. Even if every code were "
            f"equally likely that many draws would hit only {ceilings} of the codebook, so compare the "
            f"held-out column across methods, and read the windowed column (the training-time window of "
            f"recent assignments) for usage itself.")


def what_ran(rows: list[dict], summary: dict) -> str:
    config, run = rows[0]["config"], rows[0]["config"].get("run", {})
    model = config["model"]
    seeds = sorted({r["config"]["seed"] for r in rows})
    timed = [r["seconds"] for r in rows if "seconds" in r]
    wall = (f"{sum(timed) / 60:.1f} min for {'all' if len(timed) == len(rows) else len(timed)} runs, "
            "start-up and evaluation included" if timed else "not recorded")
    return "\n".join([
        f"- runs: {len(rows)} from `{summary.get('sweep')}`, finished {summary.get('updated')}",
        f"- data: `{config['data']['source']}` (train crops `{config['data']['train_crop']}`, held-out eval split), "
        f"{config['data']['image_size']}x{config['data']['image_size']} pixels",
        f"- model: ch {model['ch']}, ch_mult {tuple(model['ch_mult'])}, code dim D = {config['quantizer']['code_dim']}, "
        f"token grid {config['data']['image_size'] // 2 ** (len(model['ch_mult']) - 1)}^2",
        f"- training: {_steps_text(rows)} at global batch {config['train']['global_batch']}, "
        f"base LR {config['optim']['base_lr']} (x batch / {config['optim']['lr_ref_batch']}), "
        f"warmup {config['optim']['warmup_steps']} steps, seeds {seeds}",
        f"- machine: {run.get('num_devices', '?')} x {run.get('device_kind', '?')}, jax {run.get('jax_version', '?')}, "
        f"{os.cpu_count()} CPU cores seen by the report ({platform.machine()})",
        f"- wall time: {wall}",
    ])


def write_report(sweep_root: str, out: str, title: str | None = None) -> str:
    summary = json.load(open(os.path.join(sweep_root, "sweep.json")))
    method_of = _method_fn(summary.get("sweep"))
    rows = [r for r in (load_run(e, method_of) for e in summary["runs"]) if r is not None]
    if not rows:
        raise FileNotFoundError(f"no finished run under {sweep_root}")
    rows.sort(key=lambda r: (r["K"], r["method"], r["schedule"]))
    if len({r["total_steps"] for r in rows}) > 1:
        for r in rows:
            r["num_steps"] = r["total_steps"]
    missing = [e["name"] for e in summary["runs"] if e["name"] not in {r["name"] for r in rows}]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    plot = os.path.splitext(out)[0] + "_usage.png"
    usage_plot(rows, plot)
    text = [f"# {title or os.path.basename(os.path.splitext(out)[0])}", "",
            f"Generated by `python -m fvq_jax.tools.sweep_report --sweep_root={sweep_root} --out={out}` "
            f"on {datetime.date.today().isoformat()}.", "", "## What ran", "", what_ran(rows, summary), "",
            "## Results", "", markdown_table(rows), "", held_out_note(rows), "",
            f"![windowed usage over training]({os.path.basename(plot)})", ""]
    if missing:
        text += [f"Not finished (left out): {', '.join(missing)}", ""]
    with open(out, "w") as f:
        f.write("\n".join(text))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep_root", required=True, help="the --workdir_root of launch/sweep.py")
    parser.add_argument("--out", required=True, help="markdown file to write (the plot goes next to it)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    print(f"wrote {write_report(args.sweep_root, args.out, args.title)}")


if __name__ == "__main__":
    main()
