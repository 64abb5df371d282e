"""import_torch: reference files (.safetensors, .pt) of tokenizers and GPTs become export directories that reproduce
the reference's outputs, on one device or sharded over eight; bad sources stop with the problem named."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax import files
from fvq_jax.models.load import load_gpt, load_recorded_tokenizer, load_tokenizer, saved_config
from fvq_jax.sampling.sampler import SamplingConfig, sample_keys, sample_tokens
from fvq_jax.tools import import_torch
from tests import reference_tokenizers as ref
from tests.models import tiny_gpt
from tests.reference_tokenizers import flat_state, write_safetensors

torch = pytest.importorskip("torch")


def write_pt(state_dict, path, entry="model"):
    """torch.save of the state dict, nested under `entry` as LlamaGen's checkpoints are (None: top level)."""
    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    torch.save(tensors if entry is None else {entry: tensors, "steps": 100}, path)
    return path


@pytest.mark.parametrize("name", ref.NAMES)
def test_cli_import_reproduces_the_reference(name, tmp_path, capsys):
    r = ref.load(name)
    src = write_safetensors(r.state_dict, tmp_path / f"{name}.safetensors")
    import_torch.main(["--src", str(src), "--kind", "tokenizer", "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    bridge = "XS/2" if name == "fvq" else "none"
    assert f"imported {src} to {tmp_path / 'out'}" in text and f"{name} format: ch=32" in text
    assert f"projector={bridge}" in text

    model = load_tokenizer(tmp_path / "out").model
    ours = ref.forward(model, r.x)
    errors = ref.relative_errors(ours, r.outputs)
    print(f"{name} through import_torch: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < 1e-4, errors
    np.testing.assert_array_equal(ours["indices"], r.outputs["indices"])

    config = saved_config(tmp_path / "out")
    assert config.quantizer.projector == bridge and config.model.preset == "imported"
    assert config["import"].to_dict() == dict(source=str(src), sha256=files.sha256(src), kind="tokenizer",
                                              format=name, weights="top", ignored=[])


def test_safetensors_and_pt_import_identically(tmp_path):
    sd = ref.load("fvq").state_dict
    sources = {"safetensors": write_safetensors(sd, tmp_path / "fvq.safetensors"),
               "pt": write_pt(sd, tmp_path / "fvq.pt"),
               "bare pt": write_pt(sd, tmp_path / "bare.pt", entry=None)}
    states = {}
    for name, src in sources.items():
        written = import_torch.import_tokenizer(src, tmp_path / name)
        assert written["weights"] == ("model" if name == "pt" else "top")
        states[name] = flat_state(load_tokenizer(tmp_path / name).model)
    first = states.pop("safetensors")
    for name, state in states.items():
        assert state.keys() == first.keys()
        for path, value in first.items():
            np.testing.assert_array_equal(state[path], value, err_msg=f"{name}: {path}")
    np.testing.assert_array_equal(first["quantizer/embedding"], sd["quantize.embedding.weight"])


def test_llamagen_checkpoint_takes_its_ema_weights_and_l2_norm(tmp_path, capsys):
    sd = dict(ref.load("vqgan").state_dict, **{"quantize.codebook_used": np.zeros(65_536, np.float32)})
    ema = {k: v + 1 for k, v in sd.items()}
    src = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()},
                "ema": {k: torch.from_numpy(v) for k, v in ema.items()}}, src)
    import_torch.main(["--src", str(src), "--kind", "tokenizer", "--format", "llamagen", "--out", str(tmp_path / "a")])
    text = capsys.readouterr().out
    assert f"imported {src}['ema']" in text and "l2_norm=True" in text
    assert "not converted: quantize.codebook_used (usage statistics, no weights)" in text
    model = load_tokenizer(tmp_path / "a").model
    assert model.quantizer.l2_norm
    np.testing.assert_array_equal(np.asarray(model.quantizer.embedding[...]), ema["quantize.embedding.weight"])
    record = saved_config(tmp_path / "a")["import"]
    assert (record.format, record.weights, list(record.ignored)) == ("llamagen", "ema", ["quantize.codebook_used"])

    import_torch.main(["--src", str(src), "--kind", "tokenizer", "--format", "llamagen", "--weights", "model",
                       "--l2-norm", "false", "--norm-groups", "16", "--out", str(tmp_path / "b")])
    model = load_tokenizer(tmp_path / "b").model
    assert not model.quantizer.l2_norm and model.arch.norm_groups == 16
    np.testing.assert_array_equal(np.asarray(model.quantizer.embedding[...]), sd["quantize.embedding.weight"])


def test_bad_sources_fail_clearly(tmp_path, capsys, monkeypatch):
    sd = ref.load("fvq").state_dict
    gpt = {"tok_embeddings.weight": np.zeros((256, 64), np.float32),
           "layers.0.attention.wqkv.weight": np.zeros((192, 64), np.float32)}
    good = write_pt(sd, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100_000])
    missing = {k: v for k, v in sd.items() if k not in ("encoder.mid.1.q.bias", "decoder.norm_out.weight")}
    extra = dict(sd, **{"quantize.qbridge.norm.weight": np.ones(32, np.float32)})
    misshaped = dict(sd, **{"encoder.conv_out.weight": np.zeros((32, 64, 1, 1), np.float32)})
    wide = dict(sd, **{k: np.zeros((48,) + v.shape[1:], np.float32) for k, v in sd.items()
                       if k.startswith("quantize.qbridge.x_embedder")})
    cases = [
        (write_safetensors(gpt, tmp_path / "gpt.safetensors"), [],
         r"LlamaGen GPT state dict \(it has tok_embeddings.weight\), not a VQ tokenizer: convert it as kind 'gpt'"),
        (truncated, [], r"truncated.pt: not a readable torch checkpoint \(.*\); is it complete\?"),
        (write_safetensors(missing, tmp_path / "missing.safetensors"), [],
         r"missing \(2\): encoder.mid.1.q.bias, decoder.norm_out.weight"),
        (write_safetensors(extra, tmp_path / "extra.safetensors"), [],
         r"unexpected \(1\): quantize.qbridge.norm.weight"),
        (write_safetensors(misshaped, tmp_path / "misshaped.safetensors"), [],
         r"wrong shape \(1\): encoder.conv_out.weight \[32, 64, 1, 1\] \(expected \[32, 64, 3, 3\]\)"),
        (write_safetensors(wide, tmp_path / "wide.safetensors"), [],
         r"VQBridge \(width 48, patch 2, depth 2\) is not a preset we build"),
        (good, ["--format", "vqgan"], "format vqgan has a baked codebook, but the state dict has VQBridge keys"),
        (good, ["--norm-groups", "5"], "config field model.norm_groups: 5 groups do not divide"),
        (good, ["--weights", "ema"], r"has no 'ema' state dict; its entries: \['model', 'steps'\]"),
        (tmp_path / "absent.pt", [], "no file"),
        (good, ["--grid", "16", "--n-head", "12"], "--grid, --n-head: for --kind gpt, and this is --kind tokenizer"),
    ]
    for i, (src, flags, message) in enumerate(cases):
        with pytest.raises(SystemExit) as info:
            import_torch.main(["--src", str(src), "--kind", "tokenizer", "--out", str(tmp_path / f"out{i}"), *flags])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: python -m fvq_jax.tools.import_torch") and re.search(message, err), (message, err)
        assert not (tmp_path / f"out{i}").exists()
    with pytest.raises(SystemExit):
        import_torch.main(["--src", str(good), "--kind", "tokenizer", "--out", str(tmp_path)])
    assert "already exists; choose a new directory" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["tokenizer", "gpt"])
def test_non_finite_weights_are_refused_naming_every_tensor(kind, tmp_path, capsys):
    sd = ref.load("fvq").state_dict if kind == "tokenizer" else tiny_gpt.fixture_state_dict()
    first, *_, last = sorted(sd)
    bad = dict(sd, **{first: sd[first].copy(), last: sd[last].copy()})
    bad[first].flat[[0, 3]] = np.nan
    bad[last].flat[-1] = -np.inf
    src = write_pt(bad, tmp_path / "bad.pt") if kind == "tokenizer" else write_safetensors(bad, tmp_path / "bad.safetensors")
    flags = ["--grid", "4"] if kind == "gpt" else []
    with pytest.raises(SystemExit) as info:
        import_torch.main(["--src", str(src), "--kind", kind, "--out", str(tmp_path / "out"), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{src}: non-finite weights in 2 of {len(sd)} tensors" in err
    assert f"{first}: 2 NaN, 0 Inf of {sd[first].size} values" in err
    assert f"{last}: 0 NaN, 1 Inf of {sd[last].size} values" in err
    assert not (tmp_path / "out").exists()


def test_imported_checkpoint_restores_sharded_on_8_devices(tmp_path, python_runner):
    src = write_safetensors(ref.load("fvq").state_dict, tmp_path / "fvq.safetensors")
    import_torch.import_tokenizer(src, tmp_path / "out")
    single = flat_state(load_tokenizer(tmp_path / "out").model)
    np.savez(tmp_path / "single.npz", **{k.replace("/", "."): v for k, v in single.items()})
    out = python_runner(f"""
        import jax, ml_collections, numpy as np
        from flax import nnx
        from fvq_jax import sharding
        from fvq_jax.conversion.table import flatten
        from fvq_jax.models.load import load_tokenizer

        mesh_cfg = sharding.MeshSpec.default(data=2, fsdp=4, fsdp_min_size=1024)
        model = load_tokenizer({str(tmp_path / 'out')!r}, mesh_cfg=mesh_cfg).model
        kernel = model.decoder.mid.res1.conv1.kernel[...]
        shard = kernel.addressable_shards[0].data.shape
        print("devices", jax.device_count(), "spec", kernel.sharding.spec, "shard", shard)
        single = np.load({str(tmp_path / 'single.npz')!r})
        state = {{k.replace("/", "."): v for k, v in flatten(nnx.to_pure_dict(nnx.state(model))).items()}}
        assert sorted(state) == sorted(single.files)
        for k in single.files:
            np.testing.assert_array_equal(np.asarray(state[k]), single[k], err_msg=k)
        print("equal", len(single.files))
    """, num_devices=8)
    print(out)
    assert "devices 8" in out and "'fsdp'" in out
    assert re.search(r"shard \((\d+), (\d+), (\d+), (\d+)\)", out).group(0) in ("shard (3, 3, 16, 64)",
                                                                               "shard (3, 3, 64, 16)")
    assert f"equal {len(single)}" in out


# ----------------------------------------------------------------------------- GPTs


@pytest.fixture(scope="module")
def imported_vq(tmp_path_factory):
    """The FVQ tokenizer fixture (K 256, the GPT fixture's vocabulary) imported: the tokenizer that decodes."""
    tmp = tmp_path_factory.mktemp("vq")
    import_torch.import_tokenizer(write_safetensors(ref.load("fvq").state_dict, tmp / "fvq.safetensors"), tmp / "vq")
    return tmp / "vq"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_gpt_cli_import_reproduces_the_reference(suffix, imported_vq, tmp_path, capsys):
    data = tiny_gpt.fixture()
    sd = tiny_gpt.fixture_state_dict()
    src = (write_safetensors(sd, tmp_path / "gpt.safetensors") if suffix == ".safetensors"
           else write_pt(sd, tmp_path / "gpt.pt"))
    out = tmp_path / "gpt"
    import_torch.main(["--src", str(src), "--kind", "gpt", "--grid", "4", "--tokenizer", str(imported_vq),
                       "--out", str(out)])
    text = capsys.readouterr().out
    entry = "['model']" if suffix == ".pt" else ""
    assert f"imported {src}{entry} to {out}" in text
    assert (f"gpt, preset GPT-tiny: dim=64 n_layer=2 n_head=4 ffn_dim=256 vocab_size=256 num_classes=10 grid=4; "
            f"codes decoded by {imported_vq}") in text

    model = load_gpt(out).model
    logits = np.asarray(tiny_gpt.forward(model, jnp.asarray(data["in/tokens"][:, :-1]), jnp.asarray(data["in/labels"])))
    want = data["out/logits"]
    rel = np.abs(logits - want).max() / np.abs(want).max()
    print(f"GPT through import_torch ({suffix}): logits max relative error {rel:.1e}")
    assert rel < 1e-4, rel
    labels = jnp.asarray(data["in/sample_labels"])
    for scale in (1.0, 2.5):
        tokens = sample_tokens(model, labels, sample_keys(0, 0, 3), SamplingConfig(top_k=1, cfg_scale=scale))
        np.testing.assert_array_equal(np.asarray(tokens), data[f"out/greedy_cfg{scale}"], err_msg=f"cfg {scale}")

    config = saved_config(out)
    assert (config.task, config.precision) == ("gpt", "fp32")
    assert config.model.to_dict() == dict(
        preset="GPT-tiny", dim=64, n_layer=2, n_head=4, ffn_dim=256, vocab_size=256, num_classes=10, grid=4,
        token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1, class_dropout=0.1, rope_base=10000.0, norm_eps=1e-5,
        remat="none", scan_layers=False)
    assert config.codes.tokenizer.to_dict() == dict(path=str(imported_vq), step=None, weights="raw")
    assert config["import"].to_dict() == dict(source=str(src), sha256=files.sha256(src), kind="gpt", format="llamagen",
                                              weights="model" if suffix == ".pt" else "top", ignored=[])
    # The recorded tokenizer decodes the sampled codes (a 4 x 4 grid -> 8 x 8 pixels at its downsampling 2).
    decoder = load_recorded_tokenizer(config.codes.tokenizer).model
    images = nnx.jit(lambda m, codes: m.decode_codes(codes))(decoder, tokens.reshape(3, 4, 4))
    assert images.shape == (3, 8, 8, 3) and np.isfinite(np.asarray(images)).all()


def test_gpt_checkpoint_takes_what_llamagens_sampler_reads(tmp_path, capsys):
    sd = tiny_gpt.fixture_state_dict()
    src = tmp_path / "c2i_tiny.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()},
                "ema": {k: torch.from_numpy(v + 1) for k, v in sd.items()}, "steps": 10}, src)
    import_torch.main(["--src", str(src), "--kind", "gpt", "--grid", "4", "--out", str(tmp_path / "a")])
    assert f"imported {src}['model']" in capsys.readouterr().out
    params = flat_state(load_gpt(tmp_path / "a").model)
    np.testing.assert_array_equal(params["tok_embeddings/embedding"], sd["tok_embeddings.weight"])
    assert "codes" not in saved_config(tmp_path / "a")
    import_torch.main(["--src", str(src), "--kind", "gpt", "--grid", "4", "--weights", "ema", "--n-head", "8",
                       "--out", str(tmp_path / "b")])
    model = load_gpt(tmp_path / "b").model
    np.testing.assert_array_equal(flat_state(model)["norm/scale"], sd["norm.weight"] + 1)
    config = saved_config(tmp_path / "b")
    assert (config.model.preset, config.model.n_head, config["import"].weights) == ("custom", 8, "ema")
    assert model.config.head_dim == 8


def test_bad_gpt_sources_fail_clearly(imported_vq, tmp_path, capsys):
    sd = tiny_gpt.fixture_state_dict()
    good = write_safetensors(sd, tmp_path / "good.safetensors")
    broken = {k: v for k, v in sd.items() if k not in ("layers.1.attention.wo.weight", "norm.weight")}
    broken["layers.0.attention.wqkv.bias"] = np.zeros(192, np.float32)
    broken["output.weight"] = np.zeros((256, 32), np.float32)
    small = dict(sd, **{"tok_embeddings.weight": sd["tok_embeddings.weight"][:128],
                        "output.weight": sd["output.weight"][:128]})
    cases = [
        (write_safetensors(broken, tmp_path / "broken.safetensors"), ["--grid", "4"],
         r"broken.safetensors: LlamaGen GPT, dim=64 .*: the state dict does not match\n"
         r"  missing \(2\): layers.1.attention.wo.weight, norm.weight\n"
         r"  unexpected \(1\): layers.0.attention.wqkv.bias\n"
         r"  wrong shape \(1\): output.weight \[256, 32\] \(expected \[256, 64\]\)"),
        (good, [], r"the token grid is not stored in a LlamaGen state dict: give grid \(import_torch --grid\)"),
        (good, ["--grid", "4", "--n-head", "5"],
         r"n_head=5 does not divide the model width dim=64 .*divisors of 64: \[1, 2, 4, 8, 16, 32, 64\]"),
        (write_safetensors(ref.load("fvq").state_dict, tmp_path / "vq.safetensors"), ["--grid", "4"],
         r"this is a VQ tokenizer state dict \(it has encoder.conv_in.weight, quantize.embedding.weight\), not a "
         r"LlamaGen GPT: convert it as kind 'tokenizer'"),
        (good, ["--grid", "4", "--format", "vqgan"], "--format: for --kind tokenizer, and this is --kind gpt"),
        (write_safetensors(small, tmp_path / "small.safetensors"), ["--grid", "4", "--tokenizer", str(imported_vq)],
         r"--tokenizer .*vq has 256 codes and the GPT predicts 128"),
        (good, ["--grid", "4", "--tokenizer", str(tmp_path / "nothing")], "no checkpoint under .*nothing"),
    ]
    for i, (src, flags, message) in enumerate(cases):
        with pytest.raises(SystemExit) as info:
            import_torch.main(["--src", str(src), "--kind", "gpt", "--out", str(tmp_path / f"out{i}"), *flags])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: python -m fvq_jax.tools.import_torch") and re.search(message, err), (message, err)
        assert not (tmp_path / f"out{i}").exists()


def test_imported_gpt_restores_sharded_on_8_devices(tmp_path, python_runner):
    src = write_safetensors(tiny_gpt.fixture_state_dict(), tmp_path / "gpt.safetensors")
    import_torch.import_gpt(src, tmp_path / "out", grid=4)
    single = flat_state(load_gpt(tmp_path / "out").model)
    np.savez(tmp_path / "single.npz", **{k.replace("/", "."): v for k, v in single.items()})
    out = python_runner(f"""
        import jax, ml_collections, numpy as np
        from flax import nnx
        from fvq_jax import sharding
        from fvq_jax.conversion.table import flatten
        from fvq_jax.models.load import load_gpt

        mesh_cfg = sharding.MeshSpec.default(data=2, fsdp=2, tensor=2)
        model = load_gpt({str(tmp_path / 'out')!r}, mesh_cfg=mesh_cfg).model
        for name, kernel in (("wqkv", model.layers[1].attention.wqkv.kernel[...]),
                             ("w1", model.layers[0].feed_forward.w1.kernel[...]),
                             ("output", model.output.kernel[...])):
            print(name, "spec", tuple(kernel.sharding.spec), "shard", kernel.addressable_shards[0].data.shape)
        print("devices", jax.device_count(), "mesh", dict(model.layers[0].attention.wo.kernel[...].sharding.mesh.shape))
        single = np.load({str(tmp_path / 'single.npz')!r})
        state = {{k.replace("/", "."): v for k, v in flatten(nnx.to_pure_dict(nnx.state(model))).items()}}
        assert sorted(state) == sorted(single.files)
        for k in single.files:
            np.testing.assert_array_equal(np.asarray(state[k]), single[k], err_msg=k)
        print("equal", len(single.files))
    """, num_devices=8)
    print(out)
    assert "devices 8 mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out
    # The logical rules: embed -> fsdp, heads / mlp / vocab -> tensor.
    assert "wqkv spec ('fsdp', None, 'tensor', None) shard (32, 3, 2, 16)" in out
    assert "w1 spec ('fsdp', 'tensor') shard (32, 128)" in out
    assert "output spec ('fsdp', 'tensor') shard (32, 128)" in out
    assert f"equal {len(single)}" in out
