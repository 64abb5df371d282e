"""export_torch: an imported reference tokenizer is written back as the reference's own files (fvq exactly; vqgan
up to the bridge's float rounding); a training run exports and re-imports unchanged; an imported GPT goes back to
its reference file exactly and comes back unchanged; CLI errors."""

import os
import re
import stat

import numpy as np
import pytest
from flax import nnx

from fvq_jax.conversion import torch_files
from fvq_jax.conversion.table import flatten
from fvq_jax.tools import export_torch, import_torch
from fvq_jax.models.load import load_gpt, load_tokenizer, saved_config
from tests import reference_tokenizers as ref
from tests.models import tiny_gpt
from tests.reference_tokenizers import flat_state, write_safetensors

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def imported_gpt(tmp_path_factory):
    """The GPT fixture imported (a 4 x 4 grid): the export directory."""
    tmp = tmp_path_factory.mktemp("imported_gpt")
    import_torch.import_gpt(write_safetensors(tiny_gpt.fixture_state_dict(), tmp / "gpt.safetensors"), tmp / "out",
                            grid=4)
    return tmp / "out"


@pytest.fixture(scope="module")
def imported_fvq(tmp_path_factory):
    """The FVQ fixture imported: the export directory (it keeps the VQBridge)."""
    tmp = tmp_path_factory.mktemp("imported")
    src = write_safetensors(ref.load("fvq").state_dict, tmp / "fvq.safetensors")
    import_torch.import_tokenizer(src, tmp / "out")
    return tmp / "out"


def test_fvq_export_is_the_reference_file(imported_fvq, tmp_path, capsys):
    out = tmp_path / "fvq.safetensors"
    export_torch.main(["--workdir", str(imported_fvq), "--out", str(out)])
    assert "fvq format: ch=32" in capsys.readouterr().out
    state = torch_files.open_state_dict(out)
    sd = ref.load("fvq").state_dict
    assert sorted(state) == sorted(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    assert state.metadata == {"format": "fvq", "l2_norm": "false", "norm_groups": "32", "projector": "XS/2",
                              "source": str(imported_fvq)}


def test_vqgan_export_is_the_references_baked_file(imported_fvq, tmp_path, capsys):
    out = tmp_path / "vq.pt"
    export_torch.main(["--workdir", str(imported_fvq), "--out", str(out), "--format", "vqgan"])
    assert "(projector XS/2 baked into the codebook)" in capsys.readouterr().out
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["fvq_jax"]["format"] == "vqgan"
    baked = {k: v.numpy() for k, v in checkpoint["model"].items()}
    reference = ref.load("vqgan").state_dict
    assert sorted(baked) == sorted(reference)
    for key, value in reference.items():
        if key != "quantize.embedding.weight":
            np.testing.assert_array_equal(baked[key], value, err_msg=key)
    codebook = reference["quantize.embedding.weight"]
    error = np.abs(baked["quantize.embedding.weight"] - codebook).max() / np.abs(codebook).max()
    print(f"baked codebook vs the reference's: max relative error {error:.1e}")
    assert error < 1e-5
    # Its metadata brings the format back: the re-imported tokenizer has no bridge.
    import_torch.import_tokenizer(out, tmp_path / "again")
    assert load_tokenizer(tmp_path / "again").model.quantizer.projector_name == "none"


def test_training_run_exports_and_imports_unchanged(tiny_run, tmp_path, capsys):
    workdir, _ = tiny_run
    out = tmp_path / "run.safetensors"
    export_torch.main(["--workdir", workdir, "--out", str(out)])
    text = capsys.readouterr().out
    assert f"exported step 2 (ema weights) of {workdir}" in text
    # The local-size tokenizer is not what the reference's code builds: said, not hidden.
    assert "note: norm_groups=4" in text and "note: enc_blocks=1, dec_blocks=1" in text
    import_torch.import_tokenizer(out, tmp_path / "back")
    loaded = load_tokenizer(tmp_path / "back").model
    run = load_tokenizer(workdir).model
    expected = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(run, nnx.Param))).items()}
    got = flat_state(loaded)
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    assert loaded.arch == run.arch and loaded.quantizer.projector_name == run.quantizer.projector_name == "XS/2"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_gpt_goes_back_to_the_reference_file_and_returns_unchanged(suffix, imported_gpt, tmp_path, capsys):
    out = tmp_path / f"gpt{suffix}"
    export_torch.main(["--workdir", str(imported_gpt), "--out", str(out)])
    assert ("gpt (LlamaGen layout): dim=64 n_layer=2 n_head=4 ffn_dim=256 vocab_size=256 num_classes=10 grid=4"
            in capsys.readouterr().out)
    # torch -> ours -> torch: the reference's state dict, every array bit for bit.
    state = torch_files.open_state_dict(out, prefer=torch_files.GPT_ENTRIES)
    sd = tiny_gpt.fixture_state_dict()
    assert sorted(state) == sorted(sd)
    for key, value in sd.items():
        assert state[key].dtype == np.float32, key
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    assert state.metadata == {"n_head": "4", "grid": "4", "source": str(imported_gpt)}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # as any new file
    if suffix == ".pt":  # the layout LlamaGen's sampler reads: checkpoint["model"]
        assert sorted(torch.load(out, weights_only=True)) == ["fvq_jax", "model"]

    # ours -> torch -> ours: no --grid needed, the file records it (and n_head).
    import_torch.main(["--src", str(out), "--kind", "gpt", "--out", str(tmp_path / "back")])
    capsys.readouterr()
    assert saved_config(tmp_path / "back").model == saved_config(imported_gpt).model
    expected, got = flat_state(load_gpt(imported_gpt).model), flat_state(load_gpt(tmp_path / "back").model)
    assert sorted(got) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_cli_errors_are_clear(imported_fvq, imported_gpt, tmp_path, capsys):
    cases = [
        (["--workdir", str(imported_fvq), "--out", str(tmp_path / "a.npz")],
         r"--out .*a.npz: write one of .safetensors"),
        (["--workdir", str(tmp_path), "--out", str(tmp_path / "b.pt")],
         "no checkpoint under .*: train first, or check --workdir"),
        (["--workdir", str(imported_fvq), "--out", str(tmp_path / "c.pt"), "--format", "llamagen"],
         "format llamagen means l2-normalised codes"),
        (["--workdir", str(imported_fvq), "--out", str(tmp_path / "d.pt"), "--step", "3"],
         "is an export .one set of weights.: a step and the EMA choice apply to training runs"),
        (["--workdir", str(imported_gpt), "--out", str(tmp_path / "e.pt"), "--format", "vqgan"],
         "--format vqgan: tokenizer formats; .* holds a GPT"),
        (["--workdir", str(imported_gpt), "--out", str(tmp_path / "f.pt"), "--no-ema"],
         "is an export .one set of weights.: a step and the EMA choice apply to training runs"),
    ]
    (tmp_path / "exists.pt").write_bytes(b"")
    cases.append((["--workdir", str(imported_fvq), "--out", str(tmp_path / "exists.pt")], "already exists"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            export_torch.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: python -m fvq_jax.tools.export_torch") and re.search(message, err), err
