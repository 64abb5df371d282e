"""tools/run_curves: reference curves (CSV, JSON, plot) from tokenizer runs' logs."""

import csv
import json
import os

import numpy as np
import pytest

from fvq_jax.tools import run_curves


def _fake_run(root, name, pixel_losses, final=None):
    workdir = os.path.join(root, name)
    os.makedirs(os.path.join(workdir, "eval", "final"))
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for i, pixel in enumerate(pixel_losses):
            f.write(json.dumps(dict(step=10 * (i + 1), lr=1e-3, loss=2 * pixel, pixel_loss=pixel, perceptual_loss=0.5,
                                    quantizer_loss=0.01, usage=0.1 * (i + 1))) + "\n")
        # A resumed run logs its last step again: the later record wins.
        f.write(json.dumps(dict(step=10 * len(pixel_losses), lr=1e-3, loss=1.0, pixel_loss=0.04, perceptual_loss=0.5,
                                quantizer_loss=0.01, usage=0.99)) + "\n")
    if final:
        json.dump(final, open(os.path.join(workdir, "eval", "final", "metrics.json"), "w"))
    return workdir


def test_curves_csv_json_and_plot(tmp_path):
    a = _fake_run(tmp_path, "a", [0.4, 0.2, 0.1], final={"psnr": 21.5, "usage": 0.9})
    b = _fake_run(tmp_path, "b", [0.3, 0.15])
    out = str(tmp_path / "out" / "curves")
    paths = run_curves.write_curves({"published": a, "restart": b}, out)
    assert all(os.path.getsize(p) > 0 for p in paths)
    rows = list(csv.DictReader(open(out + ".csv")))
    assert [(r["run"], int(r["step"])) for r in rows] == [("published", 10), ("published", 20), ("published", 30),
                                                           ("restart", 10), ("restart", 20)]
    # train PSNR = 10 log10(2^2 / MSE) on the [-1, 1] range; the repeated last step took the later record.
    np.testing.assert_allclose([float(r["train_psnr"]) for r in rows],
                               10 * np.log10(4 / np.array([0.4, 0.2, 0.04, 0.3, 0.04])), rtol=1e-5)
    assert float(rows[2]["usage"]) == pytest.approx(0.99)
    summary = json.load(open(out + ".json"))
    assert summary["published"]["final_evaluation"] == {"psnr": 21.5, "usage": 0.9}
    assert summary["restart"]["final_evaluation"] == {} and summary["restart"]["logged_steps"] == 2


def test_missing_run_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_curves.main(["--run=x=" + str(tmp_path / "nope"), "--out", str(tmp_path / "c")])
    assert "nope/metrics.jsonl does not exist" in capsys.readouterr().err
