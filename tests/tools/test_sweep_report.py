"""The sweep report: table values come from the runs' own files, the plot is written, gaps are named."""

import json
import os

import pytest
from PIL import Image

from fvq_jax.tools import sweep_report


def _fake_sweep(root, workdir, sweep_file=None):
    runs = [
        {"name": "fvq_lin_k64", "workdir": workdir, "params": {"method": "fvq"}, "seconds": 12.0, "status": "finished"},
        {"name": "vq_const_k64", "workdir": workdir, "params": {"method": "vq"}, "seconds": 10.0, "status": "finished"},
        {"name": "missing_run", "workdir": os.path.join(root, "nowhere"), "params": {"method": "x"}},
    ]
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"sweep": sweep_file, "updated": "2026-11-27T12:00:00", "runs": runs}, f)


def test_report_tables_the_runs_and_plots_usage(tiny_run, tmp_path):
    workdir, _ = tiny_run
    sweep_file = tmp_path / "sweep_def.py"
    sweep_file.write_text("def method_of(params):\n    return params['method'].upper()\n")
    _fake_sweep(str(tmp_path), workdir, str(sweep_file))
    out = tmp_path / "report" / "ablation.md"
    sweep_report.main([f"--sweep_root={tmp_path}", f"--out={out}"])
    text = open(out).read()
    final = json.load(open(os.path.join(workdir, "eval", "final", "metrics.json")))
    curve = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| 64 |" in line]
    assert len(rows) == 2 and "| FVQ |" in rows[0] and "| VQ |" in rows[1]  # sorted by K, method
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert f"{final['psnr']:.2f}" in cells and f"{final['usage']:.1%}" in cells
    assert f"{curve[-1]['usage']:.1%}" == cells[4]  # windowed usage at the last step (after run, K, method, LR)
    assert "12 s" in cells[-1]
    assert f"{final['bridge_positions_used']}/4" in cells  # XS/2: 2 x 2 in-patch positions
    assert "Not finished (left out): missing_run" in text
    assert "16x16 pixels" in text and "2 steps at global batch 4" in text
    plot = tmp_path / "report" / "ablation_usage.png"
    assert Image.open(plot).size == (800, 450)  # one panel (a single codebook size and length), legend below


def test_report_without_finished_runs_is_an_error(tmp_path):
    with open(tmp_path / "sweep.json", "w") as f:
        json.dump({"runs": [{"name": "a", "workdir": str(tmp_path / "a"), "params": {}}]}, f)
    with pytest.raises(FileNotFoundError, match="no finished run"):
        sweep_report.write_report(str(tmp_path), str(tmp_path / "out.md"))
