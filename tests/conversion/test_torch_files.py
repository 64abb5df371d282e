"""Reading and writing torch state dicts: both file types, nested checkpoints, metadata, damaged files."""

import argparse
import os
import stat

import numpy as np
import pytest

from fvq_jax.conversion import torch_files

torch = pytest.importorskip("torch")

# A Fortran-ordered array among them: safetensors' own save_file would write it transposed.
ARRAYS = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.array([1.5, -2.0], np.float32),
          "c.weight": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))}


def tensors(arrays, scale=1.0):
    return {k: torch.from_numpy(v * scale) for k, v in arrays.items()}


def assert_reads(state, arrays):
    assert state.shapes == {k: v.shape for k, v in arrays.items()}
    for key, value in arrays.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_written_files_read_back_with_their_metadata(tmp_path, suffix):
    path = tmp_path / f"sd{suffix}"
    torch_files.save_state_dict(path, iter(ARRAYS.items()), metadata={"format": "vqgan", "norm_groups": 32})
    state = torch_files.open_state_dict(path)
    assert_reads(state, ARRAYS)
    assert state.metadata == {"format": "vqgan", "norm_groups": "32"}
    assert state.entry == (None if suffix == ".safetensors" else "model")
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umasks_permissions(tmp_path, suffix, umask):
    """Like any new file (safetensors' own writer makes its files 0600)."""
    previous = os.umask(umask)
    try:
        torch_files.save_state_dict(tmp_path / f"sd{suffix}", iter(ARRAYS.items()), metadata={})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / f"sd{suffix}").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_failed_write_leaves_no_file(tmp_path, suffix):
    def items():
        yield "a.weight", ARRAYS["a.weight"]
        raise OSError("No space left on device")

    path = tmp_path / f"sd{suffix}"
    (tmp_path / f"sd{suffix}.partial").write_bytes(b"left by a killed write")
    with pytest.raises(OSError, match="No space left"):
        torch_files.save_state_dict(path, items(), metadata={})
    assert list(tmp_path.iterdir()) == []


def test_nested_checkpoints_open_at_the_references_choice(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": tensors(ARRAYS), "ema": tensors(ARRAYS, 2.0), "steps": 7,
                "args": argparse.Namespace(vq_model="VQ-16")}, path)  # LlamaGen's training checkpoints hold args
    ema = torch_files.open_state_dict(path)
    assert ema.entry == "ema"
    assert_reads(ema, {k: 2 * v for k, v in ARRAYS.items()})
    assert_reads(torch_files.open_state_dict(path, weights="model"), ARRAYS)
    with pytest.raises(torch_files.UnreadableFile, match=r"no 'state_dict' state dict; its entries: \['args', 'ema'"):
        torch_files.open_state_dict(path, weights="state_dict")
    with pytest.raises(torch_files.UnreadableFile, match=r"the top level is not a flat state dict: \['args', 'ema'"):
        torch_files.open_state_dict(path, weights="top")
    # LlamaGen's GPT sampler reads "model" even beside an "ema", then DeepSpeed's "module".
    assert torch_files.open_state_dict(path, prefer=torch_files.GPT_ENTRIES).entry == "model"
    deepspeed = tmp_path / "deepspeed.pt"
    torch.save({"module": tensors(ARRAYS), "ema": tensors(ARRAYS, 2.0)}, deepspeed)
    state = torch_files.open_state_dict(deepspeed, prefer=torch_files.GPT_ENTRIES)
    assert state.entry == "module"
    assert_reads(state, ARRAYS)
    torch.save({"ema": tensors(ARRAYS, 2.0), "steps": 7}, deepspeed)
    with pytest.raises(torch_files.UnreadableFile, match=r"the top level \(no 'model' or 'module' or 'state_dict' "
                                                         r"entry\) is not a flat state dict: \['ema', 'steps'\]"):
        torch_files.open_state_dict(deepspeed, prefer=torch_files.GPT_ENTRIES)

    flat = tmp_path / "flat.pt"
    torch.save({**tensors(ARRAYS), "half": torch.tensor([1.0, 2.5], dtype=torch.bfloat16)}, flat)
    state = torch_files.open_state_dict(flat)
    assert state.entry is None
    np.testing.assert_array_equal(state["half"], np.array([1.0, 2.5], np.float32))  # bfloat16 widened
    lightning = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tensors(ARRAYS), "epoch": 3}, lightning)
    assert torch_files.open_state_dict(lightning).entry == "state_dict"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_damaged_files_fail_clearly(tmp_path, suffix):
    path = tmp_path / f"sd{suffix}"
    torch_files.save_state_dict(path, iter(ARRAYS.items()), metadata={})
    data = path.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) - 40])
    with pytest.raises(torch_files.UnreadableFile, match="is it complete?"):
        torch_files.open_state_dict(truncated)
    with pytest.raises(FileNotFoundError, match="no file"):
        torch_files.open_state_dict(tmp_path / f"absent{suffix}")
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_a_dict)
    with pytest.raises(torch_files.UnreadableFile, match="holds a list, not a state dict"):
        torch_files.open_state_dict(not_a_dict)
    with pytest.raises(ValueError, match="write a .safetensors file or a torch checkpoint"):
        torch_files.save_state_dict(tmp_path / "sd.npz", iter(ARRAYS.items()), metadata={})
