"""The CFG sweep on a tiny GPT run (2 steps on synthetic codes, decoded by the tiny tokenizer run) against an image
folder named in one flag: one samples directory and scores.json per scale, the reference's features computed once
and cached in the folder, the table, results.json and the plot."""

import json

import pytest
from PIL import Image

from fvq_jax.tools import cfg_sweep
from tests.data.conftest import write_jpegs
from tests.inception_weights import export_with_head
from tests.train.gpt_codes import CLASSES, gpt_config, train_gpt, write_synthetic_codes


@pytest.fixture(scope="module")
def gpt_run(tiny_run, tmp_path_factory):
    tokenizer = dict(path=tiny_run[0], step=2, weights="ema")
    codes_dir = write_synthetic_codes(tmp_path_factory.mktemp("codes"), tokenizer=tokenizer)
    workdir = str(tmp_path_factory.mktemp("gpt"))
    train_gpt(gpt_config(codes_dir, num_steps=2, checkpoint_every=2), workdir)
    return workdir


def test_cfg_sweep_samples_and_scores_each_scale(gpt_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FVQ_INCEPTION_WEIGHTS", str(export_with_head(tmp_path)))
    folder = tmp_path / "my_folder"
    write_jpegs(folder / "validation", [2] * CLASSES)  # <folder>/validation/class_<c>/*.jpg
    out = tmp_path / "sweep"
    cfg_sweep.main([f"--workdir={gpt_run}", "--scales=1.0,2.5", "--num_samples=6", f"--out={out}",
                    "--sample_arg=batch=6", f"--reference={folder},split=validation,crop=center", "--score_arg=batch=6"])
    log = capsys.readouterr().out
    [entry] = (folder / ".fvq_cache").glob("folder-validation-center16-n6-*.npz")
    assert log.count("reference features 6/6 images") == 1 and f"reference features: cached in {entry}" in log
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["reference"]["description"] == "folder/validation center crops"
    assert [row["cfg_scale"] for row in rows] == [1.0, 2.5]
    for row, name in zip(rows, ("cfg_1", "cfg_2.5")):
        assert json.loads((out / name / "scores.json").read_text())["gfid"] == row["gfid"]
        assert row["sampling"]["sampling"]["cfg_scale"] == row["cfg_scale"] and row["num_samples"] == 6
        assert 0 <= row["precision"] <= 1 and row["chance"] == pytest.approx(1 / CLASSES)
    table = (out / "table.md").read_text().splitlines()
    assert table[2].startswith("| CFG scale | gFID | IS | precision | recall | class consistency | chance |")
    assert table[4].startswith("| 1 | ") and table[5].startswith("| 2.5 | ")
    assert Image.open(out / "cfg_sweep.png").size == (550, 350)
