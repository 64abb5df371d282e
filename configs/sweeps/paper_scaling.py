"""The paper's scaling experiments on ImageNet 256x256 (configs/tokenizer.py:paper), as three sweeps:

  codebook  K in {16,384, 65,536, 262,144} at D = 256, each with its reference VQBridge preset
            (L/4 for 16k, L/8 for 65k and 262k): usage stays at 100% and rFID improves with K;
  width     D in {8, 32, 256} at K = 16,384, VQBridge L/4: wider codes reconstruct better;
  presets   every VQBridge preset and depth variant, and the projector baselines (none, lin/1, lin/5),
            at K = 16,384, D = 256.

Pick some with SWEEP=codebook,width,presets (default: all three, 26 distinct runs). SWEEP_STEPS shortens every
run (the paper trains 400k steps at batch 128; its preset ablation is commonly read at 50k). The same
file runs unchanged on this machine, on XManager and on a TPU pod:

  SWEEP=codebook python launch/sweep.py --sweep=configs/sweeps/paper_scaling.py --workdir_root=/data/fvq --dry-run
  xmanager launch launch/xm_launch.py -- --sweep=configs/sweeps/paper_scaling.py --workdir_root=gs://b/fvq
  launch/tpu/train.sh ... (one run per pod: --config and the --config.* flags of `--dry-run`'s commands)
"""

import os

PAPER = "configs/tokenizer.py:paper"
REFERENCE_BRIDGE = {16384: "L/4", 65536: "L/8", 262144: "L/8"}
WIDTHS = (8, 32, 256)
PRESETS = ("XS/2", "S/2", "S/4", "S/8", "B/2", "B/4", "B/8", "L/2", "L/4", "L/8", "XL/4", "XL/8",
           "B/4-d1", "B/4-d4", "S/4-d4", "L/4-d1", "L/4-d4", "L/2-d4", "XL/4-d4", "none", "lin/1", "lin/5")
SWEEPS = ("codebook", "width", "presets")


def _run(codebook: int, dim: int, projector: str) -> dict:
    run = {"config": PAPER, "config.quantizer.codebook_size": codebook, "config.quantizer.code_dim": dim,
           "config.quantizer.projector": projector}
    steps = os.environ.get("SWEEP_STEPS")
    if steps:
        run.update({"config.train.num_steps": int(steps), "config.optim.warmup_steps": int(steps) // 10,
                    "config.loss.disc_start": int(steps) // 20})
    return run


def get_sweep():
    chosen = os.environ.get("SWEEP", "")
    names = SWEEPS if not chosen else tuple(chosen.split(","))
    unknown = sorted(set(names) - set(SWEEPS))
    if unknown:
        raise ValueError(f"SWEEP must name some of {SWEEPS}, got {unknown}")
    runs = []
    if "codebook" in names:
        runs += [_run(k, 256, bridge) for k, bridge in REFERENCE_BRIDGE.items()]
    if "width" in names:
        runs += [_run(16384, d, "L/4") for d in WIDTHS if d != 256 or "codebook" not in names]
    if "presets" in names:
        runs += [_run(16384, 256, p) for p in PRESETS if p != "L/4" or "codebook" not in names]
    return runs


def name(params):
    """k16384_d256_L4, k16384_d256_B4-d1, k16384_d256_lin1, ..."""
    projector = params["config.quantizer.projector"].replace("/", "")
    return f"k{params['config.quantizer.codebook_size']}_d{params['config.quantizer.code_dim']}_{projector}"
