"""Every open performance figure in one command, each stage under its own time cap.

  python -m fvq_jax.benchmarks.suite --out DIR             # device sizes: ~8 minutes on one H100 / H200
  python -m fvq_jax.benchmarks.suite --out DIR --tiny      # CPU-sized stand-ins of every stage (CI)
  python -m fvq_jax.benchmarks.suite --out DIR --only quantizer,sampler --caps quantizer=200

Stages, in order (`STAGES`): the paper-size tokenizer train step at batch 32 and 8, the K = 262,144
L/8 step, the quantizer fwd+bwd with the XLA and the Pallas search (plus the search alone against
the bare z @ E^T product), the GPT-L train step, the KV-cache sampler against the naive one, and the
sampling server (GPT-B at 384 px: one request of 8 images with CFG against LlamaGen's vLLM server).
They reuse the single-purpose benchmarks' functions (train_step, quantizer, gpt_train_step,
sampling, serve); this file only chooses sizes, names the figures beside their PyTorch reference (one
H100, from shared/anchors) and target, and writes them.

Why this shape: a lent accelerator comes for minutes, and one failure must not cost the others.
- Each stage has a cap, checked before every measurement: once a stage has used its cap (a slow
  compile, say), the rest of it is recorded as "skipped: over cap" and the next stage starts. A
  measurement in flight is not interrupted (XLA compiles cannot be); the launcher's total timeout
  (launch/device_suite.sh) bounds the whole run.
- A stage that raises (out of memory, a kernel that does not lower) records the error text and the
  suite goes on.
- DIR/suite.json and DIR/suite.md are rewritten (atomically) after every figure, so a run killed at
  any point leaves everything measured until then.

--tiny runs the same stages at CPU sizes (tiny tokenizer, K = 64 / 256, GPT-tiny; the Pallas
search in interpret mode) so CI keeps every stage working; its figures are no performance figures,
and it compares none of them with the references or targets, which are the device sizes'. Without
--tiny on a machine whose JAX backend is the CPU the suite refuses to start (naming --tiny) instead
of trying the device sizes, which would not fit in its memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import operator
import os
import pathlib
import platform
import sys
import time
import traceback
from typing import Callable

import jax

from fvq_jax.benchmarks import gpt_train_step, quantizer, sampling, train_step
from fvq_jax.benchmarks.common import describe_device, device_peak
from fvq_jax.sampling.sampler import SamplingConfig

# ---------------------------------------------------------------------------------------------- figures

TARGET_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration: its device sizes (which the reference and the target are for)
    and the CPU stand-in --tiny measures instead (None: --tiny skips the case, whose code path
    another case of the stage already runs; each tiny tokenizer step costs a minute of CPU compiles)."""

    label: str
    device: dict
    tiny: dict | None


@dataclasses.dataclass
class Figure:
    """One number of the suite, beside the PyTorch reference (one H100) and the target.

    vs_reference is "how many times better than the reference": value / reference when higher is
    better (img/s), reference / value when lower is (ms, GiB). Neither it nor target_met is
    computed for --tiny sizes.
    """

    name: str
    value: float | None
    unit: str
    reference: float | None = None
    reference_note: str = ""
    target: str = ""  # "<op> <number>" in the figure's unit, e.g. ">= 180"
    higher_is_better: bool = True
    note: str = ""
    vs_reference: float | None = None
    target_met: bool | None = None

    def compare(self) -> Figure:
        if self.value is not None and self.reference:
            self.vs_reference = (self.value / self.reference if self.higher_is_better
                                 else self.reference / self.value if self.value else None)
        if self.value is not None and self.target:
            op, number = self.target.split()
            self.target_met = TARGET_OPS[op](self.value, float(number))
        return self


# ------------------------------------------------------------------------------------------------ runner


class OverCap(Exception):
    """A stage used its time cap before its next measurement."""


class StageRun:
    """What a stage function sees: its sizes (`pick`), the cap (`check`) and where figures go (`add`)."""

    def __init__(self, entry: dict, cap_s: float, tiny: bool, save: Callable[[], None]):
        self.entry, self.cap_s, self.tiny, self._save = entry, cap_s, tiny, save
        self.start = time.perf_counter()

    def pick(self, case: Case) -> dict | None:
        """The case's sizes for this run; None where --tiny skips it."""
        return case.tiny if self.tiny else case.device

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check(self) -> None:
        """Call before each measurement: raises OverCap once the stage has used its cap."""
        if self.elapsed() > self.cap_s:
            raise OverCap(f"{self.elapsed():.0f} s used of a {self.cap_s:.0f} s cap before the next measurement")

    def record(self, case: Case, record: dict) -> dict:
        """Keep a benchmark function's raw record (with the case's sizes) in suite.json."""
        self.entry["records"].append(dict(case=case.label, sizes=self.pick(case), **record))
        return record

    def add(self, figure: Figure) -> None:
        if not self.tiny:
            figure.compare()
        self.entry["figures"].append(dataclasses.asdict(figure))
        print(f"  {figure.name}: {_number(figure.value, figure.unit)} {figure.unit}", flush=True)
        self._save()


@dataclasses.dataclass(frozen=True)
class Stage:
    """name: its key in suite.json (and for --only / --caps); cap_s: its device-size time budget;
    fn(run) measures and `run.add`s its figures."""

    name: str
    cap_s: float
    fn: Callable[[StageRun], None]
    what: str


def run_suite(stages, out: pathlib.Path, *, tiny: bool, caps: dict[str, float] | None = None) -> dict:
    """Run `stages` in order, each under its cap (`caps` overrides by name), rewriting
    out/suite.json and out/suite.md after every figure and every stage. Returns the results."""
    out.mkdir(parents=True, exist_ok=True)
    results = header(tiny)
    save = lambda: write(out, results)  # noqa: E731
    save()
    for stage in stages:
        cap = (caps or {}).get(stage.name, TINY_CAP_S if tiny else stage.cap_s)
        entry = dict(name=stage.name, what=stage.what, cap_s=cap, status="running", elapsed_s=None, figures=[],
                     records=[])
        results["stages"].append(entry)
        save()
        run = StageRun(entry, cap, tiny, save)
        try:
            stage.fn(run)
            entry["status"] = "ok"
        except OverCap as e:
            entry.update(status="skipped: over cap", note=str(e))
        except Exception as e:  # noqa: BLE001 -- one stage's failure must not cost the stages after it
            entry.update(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                         traceback=traceback.format_exc(limit=-8)[-4000:])
        entry["elapsed_s"] = run.elapsed()
        print(f"# {stage.name}: {entry['status']} in {entry['elapsed_s']:.1f} s", flush=True)
        # Drop the stage's executables and buffers before the next one allocates.
        jax.clear_caches()
        gc.collect()
        save()
    results["finished"] = now()
    save()
    return results


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def header(tiny: bool) -> dict:
    device = jax.devices()[0]
    peak = device_peak()
    return dict(suite="fvq_jax.benchmarks.suite", sizes="tiny (CPU stand-ins, not performance figures)" if tiny
                else "device", date=now(), finished=None, device=describe_device(), device_kind=device.device_kind,
                platform=device.platform, device_count=jax.device_count(), peak=peak and dataclasses.asdict(peak),
                versions={name: version(name) for name in ("jax", "jaxlib", "flax", "optax", "numpy")}
                | {"python": platform.python_version()},
                xla_flags=os.environ.get("XLA_FLAGS", ""), argv=sys.argv, stages=[])


# ----------------------------------------------------------------------------------------------- writers


def write(out: pathlib.Path, results: dict) -> None:
    """suite.json and suite.md, each replaced whole (a kill mid-write leaves the previous one)."""
    for name, text in (("suite.json", json.dumps(results, indent=1, default=_jsonable)),
                       ("suite.md", markdown(results))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out / name)


def _jsonable(value):
    return value.item() if hasattr(value, "item") else str(value)


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return text + ("%" if unit == "%" else "")


def markdown(results: dict) -> str:
    """One table of every figure, then each stage's status."""
    v = results["versions"]
    lines = ["# fvq_jax device suite", "",
             f"{results['device']}; jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}; "
             f"XLA_FLAGS `{results['xla_flags'] or '(none)'}`; {results['date']}; sizes: {results['sizes']}.", ""]
    if results["sizes"] != "device":
        lines += ["**CPU tiny sizes: these check that every stage runs; they are not performance figures.** "
                  "References and targets are the device sizes'; nothing is compared with them.", ""]
    lines += ["Reference: the PyTorch FVQ implementation on one H100 80GB (shared/anchors). "
              "\"x ref\": times better than the reference (value / reference, or reference / value for ms and GiB).",
              "", "| stage | figure | value | unit | reference | target | x ref | met |",
              "|---|---|---|---|---|---|---|---|"]
    for stage in results["stages"]:
        for f in stage["figures"]:
            reference = "" if f["reference"] is None else _number(f["reference"], f["unit"])
            if f["reference_note"]:
                reference += f" ({f['reference_note']})"
            met = {True: "yes", False: "**no**", None: ""}[f["target_met"]]
            ratio = "" if f["vs_reference"] is None else f"{f['vs_reference']:.2f}x"
            value = _number(f["value"], f["unit"]) + (f" ({f['note']})" if f["note"] else "")
            lines.append(f"| {stage['name']} | {f['name']} | {value} | {f['unit']} | {reference} | {f['target']} | "
                         f"{ratio} | {met} |")
        if stage["status"] not in ("ok", "running"):
            lines.append(f"| {stage['name']} | *{stage['status']}* | | | | | | |")
    lines += ["", "| stage | status | seconds | cap |", "|---|---|---|---|"]
    for stage in results["stages"]:
        status = stage["status"] + (f": {stage['error']}" if "error" in stage else "")
        status = status.replace("|", "/").replace("\n", " ")[:300]
        elapsed = "" if stage["elapsed_s"] is None else f"{stage['elapsed_s']:.0f}"
        lines.append(f"| {stage['name']} | {status} | {elapsed} | {stage['cap_s']:.0f} |")
    if results["sizes"] != "device":
        stand_ins = {r["case"]: r["sizes"] for stage in results["stages"] for r in stage["records"]}
        lines += ["", "Each row's case is measured at its CPU stand-in's sizes:", "", "| case | stand-in sizes |",
                  "|---|---|"]
        lines += [f"| {case} | {', '.join(f'{k} {v}' for k, v in sizes.items())} |"
                  for case, sizes in stand_ins.items()]
    if not results["finished"]:
        lines += ["", "*Unfinished: the run stopped (or is still running) before its last stage ended.*"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ stages

TINY_CAP_S = 300.0  # per stage with --tiny: the CPU stand-ins take seconds; only a hang should reach it


def _mfu_percent(record: dict) -> float | None:
    return None if record["mfu"] == "n/a" else 100 * record["mfu"]


def tokenizer_stage(cases: tuple[tuple[Case, tuple, str], ...], run: StageRun) -> None:
    """Each case's full tokenizer train step (train_step.measure): img/s per device, step ms, XLA
    memory, MFU. cases: (case, reference key of train_step.REFERENCE_H100, img/s target)."""
    for case, reference_key, target in cases:
        sizes = run.pick(case)
        if sizes is None:
            continue
        run.check()
        config = train_step.load_config(sizes["config"])
        record = run.record(case, train_step.measure(config, sizes["batch"], sizes["steps"]))
        ref_img_s, ref_gib = train_step.REFERENCE_H100[reference_key]
        ref_note = "torch.compile" if reference_key[-1] else "eager"
        batch = reference_key[2]
        run.add(Figure(f"{case.label}: img/s per device", record["images_per_sec"] / jax.device_count(), "img/s",
                       ref_img_s, ref_note, target))
        run.add(Figure(f"{case.label}: step", record["median_ms"], "ms", 1e3 * batch / ref_img_s, ref_note,
                       higher_is_better=False))
        run.add(Figure(f"{case.label}: XLA memory", record["memory_GiB"], "GiB", ref_gib,
                       f"{ref_note}, torch peak allocated", higher_is_better=False))
        run.add(Figure(f"{case.label}: MFU (XLA FLOPs)", _mfu_percent(record), "%",
                       note="" if record["mfu"] != "n/a" else "no peak for this device"))


# Batch 32 (the headline target) first: a stage over its cap loses batch 8.
TOKENIZER_CASES = (
    (Case("VQ-16, K 16,384, L/4, 256px, bf16, batch 32", device=dict(config="paper", batch=32, steps=10),
          tiny=dict(config="tiny", batch=2, steps=1)), (16384, "L/4", 32, True), ">= 180"),
    (Case("VQ-16, K 16,384, L/4, 256px, bf16, batch 8", device=dict(config="paper", batch=8, steps=10), tiny=None),
     (16384, "L/4", 8, False), ""),
)
BIG_TOKENIZER_CASES = (
    (Case("VQ-16, K 262,144, L/8, 256px, bf16, batch 8",
          device=dict(config="paper,codebook=262144,bridge=L/8", batch=8, steps=10),
          # The same stand-in as the first tokenizer case: its compiled program is reused (a minute of CPU).
          tiny=dict(config="tiny", batch=2, steps=1)),
     (262144, "L/8", 8, False), f"> {2 * train_step.REFERENCE_H100[(262144, 'L/8', 8, False)][0]:g}"),
)

# The quantizer as training runs it (the paper config's block: bf16 bridge in 8 bands), with the
# XLA search (tiled, 2,048-token chunks) or the fused Pallas kernel: quantizer.py's variants.
SEARCH_VARIANTS = {"xla": "chunks+bf16+tokens", "pallas": "chunks+bf16+pallas"}
QUANTIZER_TINY = dict(dim=16, projector="XS/2", bridge_chunks=2, tile=64, token_chunk=32, iters=2)
QUANTIZER_DEVICE = dict(dim=256, projector=None, bridge_chunks=8, tile=8192, token_chunk=2048, iters=10)
# Most wanted first: a stage over its cap skips the rest.
QUANTIZER_CASES = tuple(
    Case(f"K {k:,}, {n:,} tokens", device=dict(QUANTIZER_DEVICE, K=k, tokens=n),
         tiny=dict(QUANTIZER_TINY, K=256, tokens=128) if (k, n) == (262144, 8192) else None)
    for k, n in ((262144, 8192), (262144, 2048), (16384, 8192), (16384, 2048)))
QUANTIZER_TARGETS = {(262144, 8192): "<= 12"}
SEARCH_CASE = Case("K 262,144, 8,192 tokens, D 256", device=dict(QUANTIZER_DEVICE, K=262144, tokens=8192),
                   tiny=dict(QUANTIZER_TINY, K=256, tokens=128))
# Search precision -> the product of the same precision in quantizer.matmul_floor (float32 runs
# as TF32 on NVIDIA GPUs at default precision, as a 'tf32' search does).
FLOOR_DTYPES = {"bf16": "bfloat16", "tf32": "float32"}


def quantizer_stage(run: StageRun) -> None:
    """Quantizer fwd+bwd (bridge, search, gather, losses) with each search: ms and XLA memory; and
    the search alone against the bare z @ E^T product (the floor for any exact search), right after
    the headline case (K 262,144, 8,192 tokens) so that a stage over its cap loses the smaller cases."""
    first, *rest = QUANTIZER_CASES
    _quantizer_fwd_bwd(run, first)
    _search_vs_product(run)
    for case in rest:
        _quantizer_fwd_bwd(run, case)


def _pallas_note(impl: str) -> str:
    return "interpret mode" if impl == "pallas" and quantizer.pallas_interpreted() else ""


def _quantizer_fwd_bwd(run: StageRun, case: Case) -> None:
    s = run.pick(case)
    if s is None:
        return
    key = (case.device["K"], case.device["tokens"])
    ref_ms, ref_gib = quantizer.REFERENCE_H100[key]
    for impl, variant in SEARCH_VARIANTS.items():
        run.check()
        cfg = quantizer.quantizer_config(s["K"], s["dim"], variant, tile=s["tile"], token_chunk=s["token_chunk"],
                                         bridge_chunks=s["bridge_chunks"], projector=s["projector"])
        record = run.record(case, dict(quantizer.measure(cfg, s["tokens"], iters=s["iters"]), variant=variant))
        run.add(Figure(f"{case.label}, {impl} search: fwd+bwd", record["median_ms"], "ms", ref_ms,
                       target=QUANTIZER_TARGETS.get(key, ""), higher_is_better=False, note=_pallas_note(impl)))
        run.add(Figure(f"{case.label}, {impl} search: XLA memory", record["memory_GiB"], "GiB", ref_gib,
                       "torch peak allocated", higher_is_better=False, note=_pallas_note(impl)))


def _search_vs_product(run: StageRun) -> None:
    s = run.pick(SEARCH_CASE)
    run.check()
    floors = {r["dtype"]: r for r in (run.record(SEARCH_CASE, r)
                                      for r in quantizer.matmul_floor(s["K"], s["tokens"], s["dim"], s["iters"]))}
    for dtype, r in floors.items():
        reference = quantizer.FLOOR_H100[(SEARCH_CASE.device["K"], SEARCH_CASE.device["tokens"], dtype)]
        run.add(Figure(f"{SEARCH_CASE.label}: bare product, {dtype}", r["matmul_ms"], "ms", reference,
                       "torch, TF32" if dtype == "float32" else "torch", higher_is_better=False))
    for precision, dtype in FLOOR_DTYPES.items():
        for impl in SEARCH_VARIANTS:
            run.check()
            r = run.record(SEARCH_CASE, quantizer.search_alone(s["K"], s["tokens"], s["dim"], impl, precision,
                                                               tile=s["tile"], token_chunk=s["token_chunk"],
                                                               iters=s["iters"]))
            run.add(Figure(f"{SEARCH_CASE.label}: {impl} search alone, {precision}", r["median_ms"], "ms",
                           higher_is_better=False, note=_pallas_note(impl)))
            run.add(Figure(f"{SEARCH_CASE.label}: {impl} search / bare {dtype} product",
                           r["median_ms"] / floors[dtype]["matmul_ms"], "x",
                           target="<= 2" if impl == "pallas" else "", higher_is_better=False, note=_pallas_note(impl)))


GPT_CASE = Case("GPT-L, K 16,384, 16x16 codes, bf16, batch 16", device=dict(preset="GPT-L", batch=16, grid=16,
                                                                             vocab=16384, steps=10),
                tiny=dict(preset="GPT-tiny", batch=2, grid=4, vocab=64, steps=2))


def gpt_stage(run: StageRun) -> None:
    """The GPT train step (gpt_train_step.measure): tokens/s, MFU (XLA's FLOPs and the analytic
    6 N + attention count), XLA memory."""
    s = dict(run.pick(GPT_CASE))
    steps = s.pop("steps")
    run.check()
    record = run.record(GPT_CASE, gpt_train_step.measure(gpt_train_step.gpt_config(**s, precision="bf16"), steps))
    run.add(Figure(f"{GPT_CASE.label}: tokens/s per device", record["tokens_per_sec"] / jax.device_count(),
                   "tokens/s"))
    run.add(Figure(f"{GPT_CASE.label}: MFU (XLA FLOPs)", _mfu_percent(record), "%", target=">= 40",
                   note=record.get("xla_flops_note") or ("" if record["mfu"] != "n/a" else "no peak for this device")))
    peak = record["peak_tflops"]
    analytic = (None if not peak else
                100 * record["analytic_tflop_per_step"] / jax.device_count() / (record["median_ms"] / 1e3) / peak)
    run.add(Figure(f"{GPT_CASE.label}: MFU (6N + attention FLOPs)", analytic, "%", target=">= 40",
                   note="" if peak else "no peak for this device"))
    run.add(Figure(f"{GPT_CASE.label}: XLA memory", record["memory_GiB"], "GiB", higher_is_better=False))


SAMPLER_CASE = Case("GPT-B, 256 codes, K 16,384, CFG 1.75, bf16, batch 32",
                    device=dict(preset="GPT-B", batch=32, grid=16, vocab=16384, iters=3),
                    tiny=dict(preset="GPT-tiny", batch=2, grid=4, vocab=64, iters=1))


def sampler_stage(run: StageRun) -> None:
    """The KV-cache sampler against the naive one that recomputes the prefix (sampling.measure)."""
    s = run.pick(SAMPLER_CASE)
    model = sampling.random_model(s["preset"], vocab=s["vocab"], classes=1000, grid=s["grid"], precision="bf16")
    config = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.75)
    codes_per_sec = {}
    for name, use_cache in (("KV cache", True), ("naive", False)):
        run.check()
        record = run.record(SAMPLER_CASE, dict(sampling.measure(model, s["batch"], config, use_cache=use_cache,
                                                                iters=s["iters"]), sampler=name))
        codes_per_sec[name] = record["codes_per_sec"]
        run.add(Figure(f"{SAMPLER_CASE.label}: {name} codes/s", record["codes_per_sec"], "codes/s"))
    run.add(Figure(f"{SAMPLER_CASE.label}: KV cache / naive", codes_per_sec["KV cache"] / codes_per_sec["naive"],
                   "x", target=">= 20"))


SERVE_CASE = Case("server, GPT-B, 24x24 codes, K 16,384, VQ-16 (384 px), bf16, CFG 2.0",
                  device=dict(preset="GPT-B", grid=24, vocab=16384, tokenizer="VQ-16", precision="bf16", clients=8,
                              requests=1, latency_images=8),
                  tiny=dict(preset="GPT-tiny", grid=4, vocab=64, tokenizer="tiny", precision="fp32", clients=2,
                            requests=2, latency_images=2, classes=10))


def serve_stage(run: StageRun) -> None:
    """The sampling server on loopback (serve.measure): one request of 8 images with CFG against LlamaGen's vLLM
    server, and 8 clients batched against the same requests one at a time."""
    # Imported here: an image without the `serve` extra (FastAPI, uvicorn, httpx) records this stage's
    # ImportError and runs the others.
    from fvq_jax.benchmarks import serve

    run.check()
    r = run.record(SERVE_CASE, serve.measure(**run.pick(SERVE_CASE), time_limit=max(run.cap_s - run.elapsed(), 1)))
    # The bar is LlamaGen's vLLM server (2.39 s on one A100), not a run of the PyTorch FVQ reference: a target.
    run.add(Figure(f"{SERVE_CASE.label}: one request of 8 images", r["latency_s"], "s", target="< 2.39",
                   higher_is_better=False, note="LlamaGen's vLLM server: 2.39 s on one A100"))
    run.add(Figure(f"{SERVE_CASE.label}: 8 clients batched / one at a time", r["speedup"], "x"))
    run.add(Figure(f"{SERVE_CASE.label}: requests answered 200", 1 - r["errors"] / r["requests"], "share",
                   target=">= 1"))
    run.add(Figure(f"{SERVE_CASE.label}: batched requests with the images they got alone",
                   (r["compared"] - r["differ"]) / r["compared"], "share", target=">= 1"))


STAGES = (
    Stage("tokenizer_step", 150, functools.partial(tokenizer_stage, TOKENIZER_CASES),
          "paper-size tokenizer train step (generator + discriminator), batch 8 and 32"),
    Stage("tokenizer_step_262k", 90, functools.partial(tokenizer_stage, BIG_TOKENIZER_CASES),
          "tokenizer train step at K = 262,144, L/8, batch 8"),
    Stage("quantizer", 100, quantizer_stage,
          "quantizer fwd+bwd, XLA and Pallas search, K 16,384 / 262,144 x 2,048 / 8,192 tokens; search vs product"),
    Stage("gpt_train_step", 50, gpt_stage, "GPT-L train step, K 16,384"),
    Stage("sampler", 50, sampler_stage, "KV-cache sampler vs naive, GPT-B"),
    Stage("serve", 120, serve_stage, "sampling server: GPT-B 24x24 with CFG, 8 images in one request; batched clients"),
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=pathlib.Path, help="directory for suite.json and suite.md")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized stand-ins of every stage")
    parser.add_argument("--only", default="", help="comma-separated stage names (default: all)")
    parser.add_argument("--caps", default="", help="name=seconds,... overriding stage caps")
    args = parser.parse_args(argv)
    names = [stage.name for stage in STAGES]
    only = [n for n in args.only.split(",") if n]
    caps = {k: float(v) for k, v in (item.split("=") for item in args.caps.split(",") if item)}
    unknown = sorted((set(only) | set(caps)) - set(names))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {names}")
    if not args.tiny and jax.default_backend() == "cpu":
        # Refused rather than shrunk: figures at other sizes than asked would sit beside the device references.
        parser.error("no accelerator here (JAX's backend is cpu): the device sizes need an H100-class GPU "
                     "(the K = 262,144 steps alone allocate tens of GiB); add --tiny for the CPU stand-ins")
    print(f"# device: {describe_device()}", flush=True)
    results = run_suite([s for s in STAGES if not only or s.name in only], args.out, tiny=args.tiny, caps=caps)
    failed = [s["name"] for s in results["stages"] if s["status"] != "ok"]
    print(f"# wrote {args.out / 'suite.json'} and suite.md" + (f"; not ok: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
