"""The parts of the GPU benchmark (`bench/gpu.py`), each run in its own process: the model,
`sample_sdjax`, `sample_torch` and `train`. Each takes the parsed arguments and `save`,
which it calls with its results so far (so a part stopped at its time limit still reports
them), and returns its whole JSON-able result.

Model (2 subject slots): UNet 320/640/1280/1280 channels, 5/10/20/20 heads, 1024-d context,
5 input channels (latents + location mask), gated adapters; text encoder 1024-d, 23 layers
(OpenCLIP ViT-H's text tower as SD 2 uses it); image encoder ViT-H/14 at 224 px; SD's VAE;
GroundingNet with 1024 hidden units; configs/sd2_base.py's settings (probed layers, remat,
bf16). `--quick`: the same structure at a few channels and 16 px, float32, on any device.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

from common import (
    IMAGE_SCALE,
    TEXT_SCALE,
    CompileClock,
    cold_compiles,
    median,
    peak_rss_mb,
    random_params,
    sample_case,
    synthetic_batch,
    train_run,
    write_cases,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD2_CONFIG = os.path.join(ROOT, "configs", "sd2_base.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from sd2_tiny import OVERRIDES as SD2_TINY_OVERRIDES  # noqa: E402


def bench_config(quick: bool, attention: str, overrides=()):
    """configs/sd2_base.py with the UNet attending through `attention` ("cudnn" or "xla");
    with `quick` shrunk as tests/sd2_tiny.py shrinks it, in float32 with XLA attention."""
    from sdjax.config import load_config

    if not quick:
        return load_config(SD2_CONFIG, [f"model.attention={attention}", *overrides])
    tiny = [*SD2_TINY_OVERRIDES, "model.attention=xla"]
    tiny += [f"model.{part}.dtype=float32" for part in ("unet", "text", "image", "vae")]
    return load_config(SD2_CONFIG, [*tiny, *overrides])


def model_config(quick: bool, attention: str):
    """The benchmark's model (`bench_config`)."""
    from sdjax.train.tasks.subject_diffusion import model_config as from_config

    return from_config(bench_config(quick, attention))[0]


def plain(model):
    """`model` without remat and with XLA attention: what XLA's cost analysis counts in full."""
    unet = dataclasses.replace(model.unet, remat=False)
    text = dataclasses.replace(model.text, remat=False)
    return dataclasses.replace(model, unet=unet, text=text, attention="xla")


def device_facts() -> dict:
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "peak_memory_gib": None if peak is None else peak / 2**30,
        "peak_rss_mb": peak_rss_mb(),
    }


def compile_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def sample_sdjax(args, save) -> dict:
    import jax

    from sdjax.pipeline import Pipeline, make_tokenizer
    from sdjax.subject_diffusion import abstract_params

    cold_compiles()
    clock = CompileClock()
    model = model_config(args.quick, args.attention)
    params = jax.device_put(random_params(abstract_params(model)))
    pipeline = Pipeline(model, params, make_tokenizer(model))
    cases = write_cases(tempfile.mkdtemp())
    batches = {}
    for batch in args.batches:

        def call(index, batch=batch):
            start = time.perf_counter()
            sample_case(pipeline, cases[index], args.steps, batch)
            return time.perf_counter() - start

        before = clock.snapshot()
        first = call(0)
        compiled = clock.snapshot()
        call(1)
        seconds = [call(r % 2) for r in range(args.repeats)]
        batches[str(batch)] = {
            "first_call_s": first,
            "compile": compile_delta(before, compiled),
            "recompiles_on_new_prompt": clock.snapshot()["compiles"] - compiled["compiles"],
            "seconds": seconds,
            "images_per_s": batch / median(seconds),
        }
        save({"batches": batches, "attention": args.attention})
    return {"batches": batches, "attention": args.attention, **device_facts()}


class DiffusersSampler:
    """The sampling loop in diffusers for `model` (see bench/gpu.py): call it with a batch
    size and a seed; it returns the seconds one call took."""

    def __init__(self, model, device: str, steps: int):
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        from sdjax.torch_modules import attach_grounding

        self.model, self.device, self.steps = model, device, steps
        self.dtype = torch.bfloat16 if model.unet.dtype == "bfloat16" else torch.float32
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(model.unet.to_diffusers())
            self.unet = unet.to(self.dtype).eval()
            self.vae = AutoencoderKL.from_config(model.vae.to_diffusers()).eval()
        attach_grounding(self.unet)
        self.scheduler = DDIMScheduler(**dataclasses.asdict(model.noise), clip_sample=False)

    def inputs(self, batch: int, seed: int) -> tuple:
        """x_T, the location mask, and random stand-ins for the encoders' outputs: context
        and grounding tokens of the three branches [subjects | empty text + subjects | empty]."""
        import torch

        m, g = self.model, torch.Generator(self.device).manual_seed(seed)

        def normal(*shape):
            return torch.randn(*shape, generator=g, device=self.device)

        h, tokens = m.latent_size, m.max_subjects * m.image.num_patches
        context = normal(3 * batch, m.text.max_position_embeddings, m.text.hidden_size)
        objs = normal(3 * batch, tokens, m.unet.objs_dim)
        loc = (torch.rand(batch, 1, h, h, generator=g, device=self.device) > 0.3).float()
        x = normal(batch, m.latent_channels, h, h)
        return x, loc, context.to(self.dtype), objs.to(self.dtype)

    def __call__(self, batch: int, seed: int) -> float:
        import torch

        x, loc, context, objs = self.inputs(batch, seed)
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            self.scheduler.set_timesteps(self.steps)
            for t in self.scheduler.timesteps:
                with_loc = torch.cat([x, loc], 1)
                branches = torch.cat([with_loc, with_loc, torch.cat([x, 0 * loc], 1)])
                out = self.unet(
                    branches.to(self.dtype),
                    t,
                    context,
                    cross_attention_kwargs={"gligen": {"objs": objs}},
                ).sample.float()
                e_t, e_i, e_u = out.chunk(3)
                eps = e_u + TEXT_SCALE * (e_t - e_i) + IMAGE_SCALE * (e_i - e_u)
                x = self.scheduler.step(eps, t, x).prev_sample
            images = self.vae.decode(x / self.vae.config.scaling_factor).sample
            ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        return time.perf_counter() - start


def sample_torch(args, save) -> dict:
    import torch

    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        return {"skipped": f"diffusers is not importable ({err}); carry its wheel (bench/gpu.sh)"}
    cuda = not args.quick
    call = DiffusersSampler(model_config(args.quick, "xla"), "cuda" if cuda else "cpu", args.steps)
    batches = {}
    for batch in args.batches:
        first = call(batch, 0)
        seconds = [call(batch, r + 1) for r in range(args.repeats)]
        batches[str(batch)] = {
            "first_call_s": first,
            "seconds": seconds,
            "images_per_s": batch / median(seconds),
        }
        save({"batches": batches})
    return {
        "batches": batches,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_rss_mb": peak_rss_mb(),
        "torch": torch.__version__,
    }


def flops(cost) -> float | None:
    """The 'flops' entry of an XLA cost analysis (a dict, or a list of one per module)."""
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def compiled_step(args, model, clock):
    """The trainer's state (freshly initialised) and compiled step for `model` (the
    benchmark's) with configs/sd2_base.py's training settings, the batch's abstract
    shapes, the mesh, and what building them cost (seconds, FLOPs)."""
    import flax.linen as nn
    import jax

    from sdjax.models.layers import unbox
    from sdjax.subject_diffusion import init_params
    from sdjax.train.state import flatten, optimizer
    from sdjax.train.step import make_train_step

    config = bench_config(args.quick, args.attention, [f"train.batch_size={args.train_batch}"])
    init_flat = lambda k: flatten(unbox(init_params(model, k)))
    run, mesh, rules, spec, loss_cfg = train_run(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        start = time.perf_counter()
        state = jax.block_until_ready(run.initial_state(init_flat, config.train.seed))
        init_s = time.perf_counter() - start
        before = clock.snapshot()
        step = run.compile()
        compiled = compile_delta(before, clock.snapshot())
        reference = make_train_step(plain(model), config.train, loss_cfg, optimizer(config.train))
        model_flops = flops(jax.jit(reference).lower(run.abstract_state, spec).cost_analysis())
    costs = {
        "batch": args.train_batch,
        "init_s": init_s,
        "compile": compiled,
        "model_flops_per_step": model_flops,
        "compiled_flops_per_step": flops(step.cost_analysis()),
    }
    return state, step, spec, mesh, costs


def train(args, save) -> dict:
    import jax

    from sdjax.parallel.sharding import global_batch

    cold_compiles()
    clock = CompileClock()
    model = model_config(args.quick, args.attention)
    state, step, spec, mesh, result = compiled_step(args, model, clock)
    save(result)
    data = synthetic_batch(model, args.train_batch)
    batch = global_batch({k: data[k] for k in spec}, mesh)

    def steps(n: int) -> tuple[float, float]:
        nonlocal state
        start = time.perf_counter()
        for _ in range(n):
            state, metrics = step(state, batch)
            loss = float(jax.device_get(metrics)["loss"])
        return time.perf_counter() - start, loss

    result["first_step_s"], _ = steps(1)
    result["step_s"] = [steps(args.train_steps)[0] / args.train_steps for _ in range(args.repeats)]
    result["images_per_s"] = args.train_batch / median(result["step_s"])
    result["last_loss"] = steps(1)[1]
    return {**result, **device_facts()}


PARTS = {"sample-sdjax": sample_sdjax, "sample-torch": sample_torch, "train": train}
