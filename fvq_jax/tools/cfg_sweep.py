"""Sample a GPT run at several CFG scales and score each: the guidance scale's trade-off in one table and plot.

  python -m fvq_jax.tools.cfg_sweep --workdir=workdir/gpt_photos --scales=1.0,1.5,1.75,2.0 \\
      --num_samples=576 --out=workdir/gpt_photos/cfg_sweep
  python -m fvq_jax.tools.cfg_sweep --workdir=RUN --scales=1.5,1.75,2.0 --num_samples=50000 --out=OUT \\
      --sample_arg=imagenet --reference=VIRTUAL_imagenet256_labeled.npz
  python -m fvq_jax.tools.cfg_sweep --workdir=RUN --scales=1.0,2.0 --num_samples=500 --out=OUT \\
      --reference=/data/my_folder,split=validation,crop=center

`--reference` is any reference the score task takes, with its options: the value of configs/score.py's
`ref` key (`photos`, an ADM batch `PATH.npz`, an image folder, `tfds:NAME`), optionally followed by that
file's other reference keys (split, crop, images, res, reconstruct, cache). For each scale the sampling job
(configs/sample.py with `--sample_arg`, then n and cfg set) writes OUT/cfg_<scale>/ and the score task
(configs/score.py with `--reference` and `--score_arg`) scores it there (scores.json); the reference's features
are computed once for all scales (and cached beside the reference for later sweeps). Then OUT/table.md
(scale, gFID, IS, precision, recall, class consistency), OUT/results.json (every score of every scale) and
OUT/cfg_sweep.png (gFID and IS against the scale). A rerun skips the sample batches already written and
scores again from the features kept beside each scale's samples.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fvq_jax import config_lib
from fvq_jax.evaluation import scoring
from fvq_jax.sampling import job

ROOT = pathlib.Path(__file__).resolve().parents[2]
COLUMNS = (  # (header, key in the scores, format)
    ("CFG scale", "cfg_scale", "{:g}"), ("gFID", "gfid", "{:.2f}"), ("IS", "inception_score", "{:.2f}"),
    ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
    ("class consistency", "class_consistency", "{:.3f}"), ("chance", "chance", "{:.3f}"),
)


def score_config_arg(reference: str, score_arg: str) -> str:
    """configs/score.py's argument: `ref=<reference>` (the reference and its keys) before `score_arg`."""
    return ",".join(a for a in (reference and f"ref={reference}", score_arg) if a)


def sweep(workdir: str, scales: list[float], num_samples: int, out, *, sample_arg: str = "",
          score_arg: str = "") -> list[dict]:
    """Sample and score the run at each scale; returns one scores dict per scale, with its `cfg_scale`."""
    out = pathlib.Path(out)
    # Resolved before the first sample is drawn: a bad reference stops the sweep, not its scoring.
    scorer = scoring.Scorer(*scoring.resolve(config_lib.load_file(ROOT / "configs" / "score.py").get_config(score_arg)))
    rows = []
    for scale in scales:
        arg = ",".join(a for a in (sample_arg, f"n={num_samples},cfg={scale}") if a)
        task = job.resolve(config_lib.load_file(ROOT / "configs" / "sample.py").get_config(arg), jax.device_count(),
                           jax.process_count())
        samples_dir = job.sample_run(task, workdir, out=out / f"cfg_{scale:g}")
        rows.append(dict(scorer(samples_dir), cfg_scale=scale))
    write_reports(rows, out)
    return rows


def write_reports(rows: list[dict], out: pathlib.Path) -> None:
    """table.md, results.json and cfg_sweep.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_table(rows))
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    plot(rows, out / "cfg_sweep.png")


def markdown_table(rows: list[dict]) -> str:
    """One row per scale; a score the reference or the Inception weights did not allow shows as '-'."""
    first = rows[0]
    lines = [f"{first['num_samples']} samples per scale against {first['reference']['num_images']} reference "
             f"images ({first['reference']['description']})", "",
             "| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [form.format(row[key]) if key in row else "-" for _, key, form in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """gFID (left axis) and IS (right axis, when the Inception has its classifier head) against the scale."""
    scales = [row["cfg_scale"] for row in rows]
    fig = Figure(figsize=(5.5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(scales, [row["gfid"] for row in rows], "o-", color="tab:blue")
    ax.set_xlabel("CFG scale")
    ax.set_ylabel("gFID (lower is better)", color="tab:blue")
    if all("inception_score" in row for row in rows):
        right = ax.twinx()
        right.plot(scales, [row["inception_score"] for row in rows], "s--", color="tab:orange")
        right.set_ylabel("IS (higher is better)", color="tab:orange")
    ax.set_title(f"{rows[0]['num_samples']} samples per scale")
    fig.tight_layout()
    fig.savefig(path, format="png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fvq_jax.tools.cfg_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the GPT run (or export) to sample")
    parser.add_argument("--scales", required=True, help="comma-separated CFG scales, e.g. 1.0,1.5,1.75,2.0")
    parser.add_argument("--num_samples", type=int, required=True, help="samples per scale")
    parser.add_argument("--out", required=True, help="where cfg_<scale>/, table.md, results.json, cfg_sweep.png go")
    parser.add_argument("--sample_arg", default="", help="configs/sample.py argument (n and cfg are set per scale)")
    parser.add_argument("--reference", default="", help="the reference: configs/score.py's `ref` value and its "
                        "reference keys, e.g. REF.npz or /data/folder,split=validation,crop=center (default: photos)")
    parser.add_argument("--score_arg", default="", help="configs/score.py argument, e.g. batch=100,k=5")
    args = parser.parse_args(argv)
    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        parser.error(f"--scales must be comma-separated numbers, got {args.scales!r}")
    if args.num_samples < 1:
        parser.error(f"--num_samples must be positive, got {args.num_samples}")
    rows = sweep(args.workdir, scales, args.num_samples, args.out, sample_arg=args.sample_arg,
                 score_arg=score_config_arg(args.reference, args.score_arg))
    print(markdown_table(rows), flush=True)


if __name__ == "__main__":
    main()
