"""Sampling speed on CPU: sdjax's one-jit sampler vs the same model and weights in PyTorch.

Both sides run the whole Subject-Diffusion sampler, float32, on the same weights (random
sdjax weights, written with `sdjax.export` to diffusers/transformers files), B images of
one prompt with subjects, S DDIM steps, three-branch guidance (text 7.5, image 1.5):

  sdjax  `sdjax.sample(pipeline, prompt, subjects, seed=..., num_steps=S, num_images=B)`:
         one jitted call (subject encoder, fusion text encoder, GroundingNet, S steps of
         one UNet call on a 3B batch + the DDIM update, clipping to uint8), PIL images out;
         set up as `sdjax sample` runs: one JAX CPU device per core
         (`sdjax.parallel.cpu.use_cpu_cores`), the batch split across them.
  torch  `sdjax.torch_modules.TorchSubjectDiffusion` on the exported folder: the same
         computation in PyTorch eager: transformers CLIP towers, diffusers
         `UNet2DConditionModel` with its gated adapters (attention_type "gated") on the same
         3B batch per step (the three branches batched), diffusers `DDIMScheduler`, under
         `torch.inference_mode()` with `torch.set_num_threads(os.cpu_count())`. Its inputs
         (token ids, reference crops, boxes, x_T) come from sdjax's `prepare_inputs` and
         `initial_noise`, made once outside the timing.
The extra work of Subject-Diffusion over a plain text-to-image UNet (adapters, a third
branch, the encoders) is therefore done on both sides. The two sides' images are compared
(max / mean |difference| in uint8 levels) as a check that they compute the same thing.

Configs (pixel space, no VAE; text and image towers as in configs/toy.py):
  toy         configs/toy.py: 32 px, UNet 16/32/64 channels, 1 layer per block, region-bound
              attention at 16 and 8 px
  toy-free    the same without region-bound attention (its cost: toy against toy-free)
  mid         64 px, UNet 128/256/256 channels, 2 layers per block, 4 heads of 64 channels

Each side runs in its own process (this script with `--worker`). First calls: sdjax traces,
compiles (the persistent compile cache is off) and runs, then samples another prompt with
other subjects and another seed, counting the XLA compilations that triggers (a new
prompt must compile nothing); torch runs once to warm up. Then `--repeats` timed calls
(the two requests in turn) alternate between the two processes. Reported: median seconds
per call and images/s, the speed-up torch/sdjax, sdjax's compile time (XLA compile +
trace + lowering, summed from jax.monitoring events), peak RSS of each process (the
JSON also says whether the PyTorch process imported JAX: it must not), machine facts;
then one `JSON {...}` line.

    python bench/sample_cpu.py                 # the real measurement: about an hour on
                                               # 2 cores (a mid call is ~32 TFLOP)
    python bench/sample_cpu.py --configs toy   # the toy config alone: a few minutes
    python bench/sample_cpu.py --quick         # tiny sizes, 3 steps: validation only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from common import (
    IMAGE_SCALE,
    TEXT_SCALE,
    CompileClock,
    Worker,
    cold_compiles,
    fmt,
    interleave,
    machine_facts,
    median,
    peak_rss_mb,
    random_params,
    report,
    rss_mb,
    sample_case,
    serve,
    subjects_of,
    write_cases,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs", "toy.py")

CONFIGS = {
    "toy": [],
    "toy-free": ["model.region_attention=False"],
    "mid": [
        "model.unet.block_out_channels=(128, 256, 256)",
        "model.unet.layers_per_block=2",
        "model.unet.heads=(2, 4, 4)",
        "model.unet.norm_num_groups=32",
        "model.unet.sample_size=64",
        "model.resolution=64",
    ],
}
# --quick: the same code paths at toy cost (the mid structure, 2 layers per block, at 32 px).
QUICK_CONFIGS = {
    "toy": [],
    "toy-free": ["model.region_attention=False"],
    "mid": [
        "model.unet.block_out_channels=(32, 64, 64)",
        "model.unet.layers_per_block=2",
        "model.unet.heads=(2, 4, 4)",
    ],
}
DEFAULT_REPEATS = {"toy": 9, "toy-free": 9, "mid": 3}


def model_config(overrides: list[str]):
    from sdjax.config import load_config
    from sdjax.train.tasks.subject_diffusion import model_config

    return model_config(load_config(TOY, overrides))


def prepare(folder: str, overrides: list[str], batch: int) -> list[dict]:
    """Random weights saved as an sdjax pipeline (`folder/pipeline`) and exported
    (`folder/export`); the cases, and their PyTorch inputs in `folder/inputs.npz`."""
    import jax

    from sdjax.export import export_pipeline
    from sdjax.pipeline import Pipeline, save_pipeline
    from sdjax.sampling import initial_noise, prepare_inputs
    from sdjax.subject_diffusion import abstract_params

    config, tokenizer = model_config(overrides)
    pipeline = Pipeline(config, random_params(abstract_params(config)), tokenizer)
    save_pipeline(pipeline, os.path.join(folder, "pipeline"))
    export_pipeline(pipeline, os.path.join(folder, "export"))
    cases = write_cases(os.path.join(folder, "refs"))
    arrays = {}
    for i, case in enumerate(cases):
        one = prepare_inputs(pipeline, case["prompt"], subjects_of(case))
        arrays.update({f"{i}/{k}": np.broadcast_to(v, (batch, *v.shape)) for k, v in one.items()})
        rng = jax.random.fold_in(jax.random.key(case["seed"]), 0)  # as `sample` draws it
        arrays[f"{i}/x_T"] = np.asarray(initial_noise(config, rng, batch))
    np.savez(os.path.join(folder, "inputs.npz"), **arrays)
    return cases


class Sampler:
    """One side of the comparison, served in a worker: `load` the model, then
    `_sample(i)` samples case i in one batch. The sdjax side's `clock` counts compiles."""

    side = ""
    clock = None

    def setup(self, folder: str, cases: list[dict], steps: int, batch: int) -> dict:
        facts = {**self.load(folder, cases, steps, batch), "rss_loaded_mb": rss_mb()}
        images, facts["first_call_s"] = self.timed(0)
        np.save(os.path.join(folder, f"{self.side}.npy"), images)
        if self.clock:  # sdjax: the first call compiled; a new prompt and seed must not
            facts["compile"] = self.clock.snapshot()
            facts["second_call_s"] = self.timed(1)[1]
            facts["recompiles_on_new_prompt"] = self.clock.compiles - facts["compile"]["compiles"]
        return facts

    def timed(self, index: int) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        images = self._sample(index)
        return images, time.perf_counter() - start

    def run(self, repeat: int) -> dict:
        return {"seconds": self.timed(repeat % 2)[1]}

    def finish(self) -> dict:
        return {"peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb()}


class SdjaxSampler(Sampler):
    side = "sdjax"

    def load(self, folder: str, cases: list[dict], steps: int, batch: int) -> dict:
        from sdjax.parallel.cpu import use_cpu_cores

        devices = use_cpu_cores()
        cold_compiles()
        self.clock = CompileClock()
        from sdjax.pipeline import load_pipeline

        self.pipeline = load_pipeline(os.path.join(folder, "pipeline"))
        self.cases, self.steps, self.batch = cases, steps, batch
        return {"cpu_devices": devices}

    def _sample(self, index: int) -> np.ndarray:
        return sample_case(self.pipeline, self.cases[index], self.steps, self.batch)


class TorchSampler(Sampler):
    side = "torch"

    def load(self, folder: str, cases: list[dict], steps: int, batch: int) -> dict:
        # A PyTorch user's process: diffusers must not import its Flax classes (and JAX),
        # which it does whenever flax is installed, as it is here.
        os.environ["USE_FLAX"] = "0"
        import torch

        from sdjax.torch_modules import TorchSubjectDiffusion

        torch.set_num_threads(os.cpu_count())
        self.steps = steps
        data = np.load(os.path.join(folder, "inputs.npz"))
        self.inputs = [
            {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")}
            for i in range(len(cases))
        ]
        self.model = TorchSubjectDiffusion(os.path.join(folder, "export"))
        return {}

    def finish(self) -> dict:
        return {**super().finish(), "jax_imported": "jax" in sys.modules}

    def _sample(self, index: int) -> np.ndarray:
        import torch

        inputs = dict(self.inputs[index])
        x_T = inputs.pop("x_T")
        with torch.inference_mode():
            return self.model(inputs, x_T, self.steps, TEXT_SCALE, IMAGE_SCALE, self.steps)


def measure(name: str, overrides: list[str], args) -> dict:
    repeats = args.repeats or (2 if args.quick else DEFAULT_REPEATS[name])
    with tempfile.TemporaryDirectory() as folder:
        cases = prepare(folder, overrides, args.batch)
        setup = {"folder": folder, "cases": cases, "steps": args.steps, "batch": args.batch}
        with (
            Worker(__file__, "sdjax") as sdjax_worker,
            Worker(__file__, "torch") as torch_worker,
        ):
            workers = {"sdjax": sdjax_worker, "torch": torch_worker}
            result = {side: {"setup": w.call("setup", **setup)} for side, w in workers.items()}
            for side, replies in interleave(workers, repeats).items():
                result[side]["seconds"] = [r["seconds"] for r in replies]
                result[side].update(workers[side].call("finish"))
        ours, theirs = (np.load(os.path.join(folder, f"{s}.npy")).astype(int) for s in workers)
    diff = np.abs(ours - theirs)
    return {
        "config": name,
        "overrides": overrides,
        "repeats": repeats,
        "pixel_diff_max": int(diff.max()),
        "pixel_diff_mean": float(diff.mean()),
        **result,
    }


def table_row(r: dict, batch: int) -> list:
    ours, theirs = median(r["sdjax"]["seconds"]), median(r["torch"]["seconds"])
    compile_ = r["sdjax"]["setup"]["compile"]
    return [
        r["config"],
        f"{fmt(ours)} ({fmt(batch / ours)})",
        f"{fmt(theirs)} ({fmt(batch / theirs)})",
        f"{theirs / ours:.2f}x",
        f"{compile_['total']:.1f} ({compile_['compile']:.1f} XLA)",
        f"{r['sdjax']['setup']['first_call_s']:.1f}",
        r["sdjax"]["setup"]["recompiles_on_new_prompt"],
        f"{r['sdjax']['peak_rss_mb']:.0f}",
        f"{r['torch']['peak_rss_mb']:.0f}",
        f"{r['pixel_diff_max']} / {r['pixel_diff_mean']:.2f}",
    ]


HEADERS = [
    "config",
    "sdjax s/call (img/s)",
    "torch s/call (img/s)",
    "speed-up",
    "sdjax compile s",
    "sdjax 1st call s",
    "compiles, new prompt",
    "sdjax peak RSS MB",
    "torch peak RSS MB",
    "pixel diff max / mean",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: validation only")
    parser.add_argument(
        "--configs", default="toy,toy-free,mid", help="comma-separated: toy, toy-free, mid"
    )
    parser.add_argument("--steps", type=int, help="DDIM steps (default 50; quick 3)")
    parser.add_argument("--batch", type=int, help="images per call (default 4; quick 2)")
    parser.add_argument("--repeats", type=int, help="timed calls per side (default toy 9, mid 3)")
    parser.add_argument("--worker", choices=("sdjax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(SdjaxSampler() if args.worker == "sdjax" else TorchSampler())
        return
    facts = machine_facts()
    args.steps = args.steps or (3 if args.quick else 50)
    args.batch = args.batch or (2 if args.quick else 4)
    table = QUICK_CONFIGS if args.quick else CONFIGS
    results = []
    for name in args.configs.split(","):
        if name not in table:
            sys.exit(f"unknown config {name!r}; choose from {sorted(table)}")
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results.append(measure(name, table[name], args))
    title = (
        f"Sampling on CPU: {args.batch} images, {args.steps} DDIM steps, three-branch guidance,"
        f" float32{' (QUICK: validation only)' if args.quick else ''}"
    )
    report(
        [(title, HEADERS, [table_row(r, args.batch) for r in results])],
        {
            "bench": "sample_cpu",
            "quick": args.quick,
            "steps": args.steps,
            "batch": args.batch,
            "results": results,
            "machine": facts,
        },
    )


if __name__ == "__main__":
    main()
