"""GPU benchmark: Subject-Diffusion at Stable Diffusion 2-base size (random weights), 512 px.

Run it through `bench/gpu.sh` on one H100 or H200: it finishes in under 10 minutes
(`--budget`) and prints everything. Three parts (`bench/gpu_parts.py`), each in its own
process, one after the other, so that each framework's GPU memory peak is its own:

  sample-sdjax  `sdjax.sample` at batch 1 and 8: 50 DDIM steps, three-branch guidance (one
                UNet call on a 3B batch per step), subject encoder, fusion text encoder,
                GroundingNet and VAE decoder, all in one jitted call; bf16 matmuls (the
                config's), cuDNN attention in the UNet (`--attention`). Per batch: compile
                time (cold: the persistent compile cache is off), whether a second prompt
                and seed compile anything, images/s over `--repeats` calls.
  sample-torch  the same sampling loop in diffusers: `UNet2DConditionModel` of the same
                config (`UNetConfig.to_diffusers()`: the 5th input channel and the gated
                adapters, fed through `sdjax.torch_modules.attach_grounding`) in bf16 with
                SDPA (diffusers' default attention processor), `DDIMScheduler`, the three
                branches batched, the same guidance, then the `AutoencoderKL` decoder in
                float32 as sdjax runs it; eager, `torch.inference_mode()`, diffusers' own
                random weights. This side does not run the encoders (under 1% of the work:
                a few TFLOP per image against ~100 for the UNet loop): random tensors of
                their output shapes stand in for them, made outside the timing.
  train         sdjax's train step with configs/sd2_base.py's settings (the authors'
                trainable set, bf16, remat, attention-map loss, AdamW) at `--train-batch`
                512 px images, built by the trainer's `plan_step`: state initialisation and
                compile times, images/s, MFU and HFU, peak memory. Model FLOPs per step:
                XLA's cost analysis of the same step lowered without remat and with XLA
                attention (the analysis does not count cuDNN custom calls); HFU uses the
                compiled step's own count (remat's recomputation in, cuDNN attention out).
                Peak rate: `--peak-tflops`, else the card's dense bf16 datasheet rate.

Each part has a time cap; one that fails or runs out is reported as such and the others
still run. A part that fails with cuDNN attention is retried once with XLA attention.
Without a GPU this says so and runs `--quick` on the CPU instead (a tiny latent model in
float32, 2 steps): that checks the script and measures nothing.

    bench/gpu.sh [--parts sample-sdjax,sample-torch,train] [--train-batch 16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import fmt, machine_facts, median, report

# Seconds each part keeps for itself: a part may use the budget left minus what the parts
# after it keep, so one that ends early leaves its time to the next ones.
RESERVE = {"sample-sdjax": 150, "sample-torch": 60, "train": 150}
DEFAULTS = {  # full run, --quick
    "steps": (50, 2),
    "repeats": (3, 1),
    "batches": ("1,8", "1,2"),
    "train_batch": (16, 2),
    "train_steps": (5, 1),
}


def find_gpu() -> str | None:
    """The first GPU that nvidia-smi lists, or None. Asks no framework, so this process
    never holds GPU memory."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return gpus[0] if out.returncode == 0 and gpus else None


def worker_args(args, attention: str) -> list[str]:
    forwarded = [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in DEFAULTS]
    return [*forwarded, f"--attention={attention}"] + (["--quick"] if args.quick else [])


def run_part(part: str, args, attention: str, timeout: float) -> dict:
    """One part in its own process, stopped after `timeout` seconds. A part saves its
    results as it goes, so one stopped at its time limit still reports what it finished."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        command = [sys.executable, __file__, "--worker", part, "--result", path]
        print(f"\n== {part}, attention {attention} (at most {timeout:.0f} s) ==", flush=True)
        try:
            proc = subprocess.run(command + worker_args(args, attention), timeout=timeout)
            failure = None if proc.returncode == 0 else f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            failure = f"stopped at its time limit of {timeout:.0f} s"
        result = {}
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
        if failure:
            result.update(failed=failure + " (its output is above)", exited=failure[0] == "e")
        return result


def run_parts(args) -> dict:
    """Every part in turn within `--budget` seconds; a part that exits with an error under
    cuDNN attention runs once more with XLA attention."""
    deadline = time.monotonic() + args.budget
    parts = args.parts.split(",")
    results = {}
    for index, part in enumerate(parts):
        attention = "xla" if args.quick else args.attention
        while True:
            left = deadline - time.monotonic() - sum(RESERVE[p] for p in parts[index + 1 :])
            if left < 30:
                results[part] = {"failed": "no time left in the budget"}
                break
            results[part] = run_part(part, args, attention, left)
            retry = results[part].get("exited") and attention == "cudnn" and part != "sample-torch"
            if not retry:
                break
            print(f"{part} failed with cuDNN attention; retrying with XLA attention")
            attention = "xla"
        print("PART " + json.dumps({part: results[part]}), flush=True)
    return results


def peak_bf16(device: str, override: float | None) -> float | None:
    """Dense bf16 FLOP/s of the card (datasheet), or None when unknown."""
    if override:
        return override * 1e12
    if "H100" in device and "PCIe" in device:
        return 756e12
    return 989e12 if "H100" in device or "H200" in device else None


def state_of(result: dict | None) -> str | None:
    """What went wrong with a part (failed, skipped, not run), or None."""
    if result is None:
        return "not run"
    return result.get("failed") or result.get("skipped")


SAMPLE_HEADERS = [
    "batch",
    "sdjax img/s",
    "sdjax s/call",
    "torch img/s",
    "torch s/call",
    "speed-up",
    "sdjax compile s",
    "compiles, new prompt",
]
TRAIN_HEADERS = [
    "batch",
    "images/s",
    "step s",
    "compile s",
    "state init s",
    "model TFLOP/step",
    "MFU",
    "HFU",
    "peak memory",
]


def memory(result: dict) -> str:
    """The peak GPU memory of a part (its peak RSS where it ran on the CPU)."""
    if result.get("peak_memory_gib") is None:
        return f"peak RSS {result['peak_rss_mb']:.0f} MB (no GPU)"
    return f"peak GPU memory {result['peak_memory_gib']:.2f} GiB"


def sample_row(batch: str, ours: dict | None, theirs: dict | None) -> list:
    """One batch size: `ours` / `theirs` are that batch's sdjax / torch results (or None)."""
    a, b = (median(r["seconds"]) if r else None for r in (ours, theirs))
    return [
        batch,
        fmt(ours and ours["images_per_s"]),
        fmt(a),
        fmt(theirs and theirs["images_per_s"]),
        fmt(b),
        f"{b / a:.2f}x" if a and b else "n/a",
        f"{ours['compile']['total']:.0f} ({ours['compile']['compile']:.0f} XLA)" if ours else "n/a",
        ours["recompiles_on_new_prompt"] if ours else "n/a",
    ]


def sample_table(results: dict) -> tuple[str, list[str], list[list]]:
    sides = [results.get("sample-sdjax"), results.get("sample-torch")]
    per_batch = [(r or {}).get("batches", {}) for r in sides]
    rows = [sample_row(b, *(p.get(b) for p in per_batch)) for b in per_batch[0] or per_batch[1]]
    for name, result in zip(("sdjax", "torch"), sides):
        rows.append([f"{name}: {state_of(result) or memory(result)}"] + [""] * 7)
    return "Sampling: 512 px, 50 DDIM steps, three-branch guidance, bf16", SAMPLE_HEADERS, rows


def train_table(result: dict | None, peak: float | None) -> tuple[str, list[str], list[list]]:
    title = "Training step: configs/sd2_base.py settings, 512 px"
    if "step_s" not in (result or {}):
        return title, TRAIN_HEADERS, [[state_of(result) or "no result"] + [""] * 8]
    step_s = median(result["step_s"])

    def utilisation(flops):
        return "n/a" if not flops or not peak else f"{flops / step_s / peak:.1%}"

    model_flops = result["model_flops_per_step"]
    row = [
        result["batch"],
        fmt(result["images_per_s"]),
        fmt(step_s),
        f"{result['compile']['total']:.0f}",
        f"{result['init_s']:.0f}",
        fmt(model_flops and model_flops / 1e12),
        utilisation(model_flops),
        utilisation(result["compiled_flops_per_step"]),
        memory(result),
    ]
    return title, TRAIN_HEADERS, [row]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model: validation only")
    parser.add_argument("--parts", default=",".join(RESERVE), help="comma-separated parts")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 50)")
    parser.add_argument("--repeats", type=int, help="timed calls per batch size (default 3)")
    parser.add_argument("--batches", help="sampling batch sizes (default 1,8)")
    parser.add_argument("--train-batch", type=int, help="training batch (default 16)")
    parser.add_argument("--train-steps", type=int, help="steps per timed run (default 5)")
    parser.add_argument("--attention", choices=("cudnn", "xla"), default="cudnn")
    parser.add_argument("--budget", type=float, default=560, help="seconds for all parts")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 TFLOP/s")
    parser.add_argument("--worker", choices=tuple(RESERVE), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    gpu = None if args.worker else find_gpu()
    if not args.worker and gpu is None and not args.quick:
        print(
            "NO GPU: nvidia-smi lists none. This benchmark needs one H100/H200; running the "
            "--quick CPU validation instead (tiny model, float32): it measures nothing.",
            flush=True,
        )
        args.quick = True
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.worker:
        from gpu_parts import PARTS

        args.batches = [int(b) for b in str(args.batches).split(",")]

        def save(result: dict) -> None:
            with open(args.result + ".tmp", "w") as f:
                json.dump(result, f)
            os.replace(args.result + ".tmp", args.result)

        save(PARTS[args.worker](args, save))
        return
    facts = {**machine_facts(), "gpu": gpu}
    results = run_parts(args)
    device = next((r["device"] for r in results.values() if "device" in r), gpu or "")
    peak = peak_bf16(device, args.peak_tflops)
    tables = [sample_table(results), train_table(results.get("train"), peak)]
    if args.quick:
        tables = [(f"QUICK CPU VALIDATION, not {title}", h, r) for title, h, r in tables]
    report(
        tables,
        {
            "bench": "gpu",
            "quick": args.quick,
            "peak_flops": peak,
            "results": results,
            "machine": facts,
        },
    )


if __name__ == "__main__":
    main()
