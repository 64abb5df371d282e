"""bridge_positions: the usage window of a trained VQBridge run, by in-patch position, against a
loop over the saved window; the CLI output and its errors."""

import io
from contextlib import redirect_stdout

import numpy as np
import pytest

from fvq_jax.tools import bridge_positions
from fvq_jax.train.restore import restore_tokenizer


def test_positions_of_the_saved_window_against_a_loop(tiny_run):
    workdir, _ = tiny_run
    report = bridge_positions.position_report(workdir)
    window = np.asarray(restore_tokenizer(workdir).state.model_state["quantizer"]["usage_buffer"][...])
    window = window[window >= 0]
    side, patch = 8, 2  # K = 64, XS/2
    used = {int(n) for n in window}
    expected = np.zeros((patch, patch))
    for n in used:  # code n is grid cell (n // side, n % side)
        expected[(n // side) % patch, (n % side) % patch] += 1 / (side * side / patch ** 2)
    assert report["patch"] == 2 and report["window"] == window.size > 0
    np.testing.assert_allclose(report["per_position"], expected)
    assert report["usage"] == len(used) / 64
    assert report["live_positions"] == np.count_nonzero(expected)
    assert report["usage_within_live"] == pytest.approx(expected[expected > 0].mean())

    out = io.StringIO()
    with redirect_stdout(out):
        bridge_positions.main([f"--workdir={workdir}"])
    text = out.getvalue()
    assert f"{report['window']:,} assignments" in text and f"live positions: {report['live_positions']}/4" in text
    # The 2 x 2 grid of usage, then the 2 x 2 grid of first steps from metrics.jsonl.
    assert len([line for line in text.splitlines() if line.startswith("  ")]) == 4
    assert report["first_live"].shape == (2, 2) and report["first_live"].max() <= report["step"]


def test_first_live_steps_from_logged_shares():
    share = "bridge_position_share/r{}c{}"
    records = [{"step": 20, share.format(0, 0): 0.5, share.format(1, 0): 0.5, share.format(0, 1): 0.0},
               {"step": 10, share.format(0, 0): 1.0, share.format(1, 0): 0.0},
               {"step": 30, share.format(0, 1): 0.2, share.format(1, 0): 0.0}]
    np.testing.assert_array_equal(bridge_positions.first_live_steps(records, 2), [[10, 30], [20, -1]])


def test_cli_names_a_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bridge_positions.main([f"--workdir={tmp_path}"])
    assert "no checkpoint under" in capsys.readouterr().err
