"""Training speed on CPU: sdjax's train step vs the same model trained with PyTorch.

Model and settings: configs/toy.py (32 px pixel space, UNet 16/32/64 with adapters, 2-layer
text and image towers), its batch (train.batch_size = 32), float32, the same random initial
weights on both sides (an sdjax pipeline folder, read into the state by
`StepPlan.initial_state`, and its `sdjax.export` for PyTorch). Trained: unet, text_encoder,
grounding, cls_mlp (the toy config's `train.trainable`); the image encoder is frozen. Every
step sees the same synthetic batch (the loader's contract: random images, references, boxes, masks,
token ids), with fresh noise and timesteps per step on each side.

  sdjax       the trainer's own step: `sdjax.train.run.plan_step` + `make_train_step`,
              AOT-compiled, state donated; image encoder, CLS MLP, fusion text encoder,
              GroundingNet, UNet, epsilon MSE, gradients of the trainable part, global-norm
              clipping, AdamW, EMA; metrics fetched every step (as the training loop does).
              The attention-map loss is off (loss.attn_weight=0): the PyTorch side has none.
  torch       the exported modules (transformers CLIP towers, diffusers
              UNet2DConditionModel with gated adapters, `sdjax.torch_modules` GroundingNet
              and CLS MLP): the same forward and loss, `loss.backward()`,
              `clip_grad_norm_`, `torch.optim.AdamW(foreach=True)`, EMA with one foreach
              lerp; `torch.set_num_threads(os.cpu_count())`. The location mask comes
              precomputed (sdjax builds it inside its step: a negligible cost).
  sdjax+attn  (sdjax only) the toy config as it trains: attention-map loss on.

Each side runs in its own process (this script with `--worker`); after compilation
(sdjax; the persistent compile cache is off) and one warm-up step, `--repeats` runs of
`--steps` steps alternate between the processes. Reported: median examples/s, the
speed-up over PyTorch, compile and state-initialisation times, peak RSS per process (in
the JSON also the sdjax peak before and after compiling), the last loss, machine facts;
then one `JSON {...}` line.

    python bench/train_cpu.py                  # the real measurement (~10 min on 2 cores)
    python bench/train_cpu.py --quick          # tests/train_config.py (16 px): validation only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from common import (
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
    serve,
    synthetic_batch,
    train_run,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "toy.py")
QUICK_CONFIG = os.path.join(ROOT, "tests", "train_config.py")
NO_ATTN = ["loss.attn_weight=0.0"]
SIDES = {"sdjax": NO_ATTN, "torch": NO_ATTN, "sdjax+attn": []}


def load(config_path: str, overrides: list[str]):
    from sdjax.config import load_config
    from sdjax.train.tasks.subject_diffusion import model_config

    config = load_config(config_path, overrides)
    return config, *model_config(config)


def prepare(folder: str, config_path: str) -> None:
    """Random weights as an sdjax pipeline and exported; the batch in `folder/batch.npz`."""
    from sdjax.export import export_pipeline
    from sdjax.pipeline import Pipeline, save_pipeline
    from sdjax.subject_diffusion import abstract_params

    config, model, tokenizer = load(config_path, NO_ATTN)
    pipeline = Pipeline(model, random_params(abstract_params(model)), tokenizer)
    save_pipeline(pipeline, os.path.join(folder, "pipeline"))
    export_pipeline(pipeline, os.path.join(folder, "export"))
    np.savez(os.path.join(folder, "batch.npz"), **synthetic_batch(model, config.train.batch_size))


class Trainer:
    """One side of the comparison, served in a worker: `setup` builds the model, state and
    batch; `train_step()` runs one step and returns its loss."""

    examples = 0

    def run(self, repeat: int, steps: int) -> dict:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.train_step()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "examples_per_s": steps * self.examples / seconds, "loss": loss}

    def finish(self) -> dict:
        return {"peak_rss_mb": peak_rss_mb()}


class SdjaxTrainer(Trainer):
    def setup(self, folder: str, config_path: str, overrides: list[str]) -> dict:
        cold_compiles()
        clock = CompileClock()
        import flax.linen as nn
        import jax

        from sdjax.parallel.sharding import global_batch
        from sdjax.pipeline import load_pipeline
        from sdjax.train.state import flatten

        config, model, _ = load(config_path, overrides)
        weights = load_pipeline(os.path.join(folder, "pipeline")).params
        # The exported random weights, not the initialiser (tens of seconds to compile on
        # CPU): both sides start from the same weights.
        plan, mesh, rules, spec, _ = train_run(config)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            start = time.perf_counter()
            init = lambda _: flatten(weights)  # noqa: E731
            self.state = jax.block_until_ready(plan.initial_state(init, config.train.seed))
            init_s = time.perf_counter() - start
            rss_after_init = peak_rss_mb()
            before = clock.snapshot()
            self.step = plan.compile()
            after = clock.snapshot()
            rss_after_compile = peak_rss_mb()
        data = np.load(os.path.join(folder, "batch.npz"))
        self.batch = global_batch({k: data[k] for k in spec}, mesh)
        self.examples = config.train.batch_size
        first = self.run(0, 1)
        compiled = {k: after[k] - before[k] for k in ("trace", "lower", "compile", "total")}
        return {
            "init_s": init_s,
            "compile": compiled,
            "first_step_s": first["seconds"],
            "peak_rss_after_init_mb": rss_after_init,
            "peak_rss_after_compile_mb": rss_after_compile,
        }

    def train_step(self) -> float:
        import jax

        self.state, metrics = self.step(self.state, self.batch)
        return float(jax.device_get(metrics)["loss"])


class TorchTrainer(Trainer):
    def setup(self, folder: str, config_path: str, overrides: list[str]) -> dict:
        import torch

        from sdjax.torch_modules import TorchSubjectDiffusion

        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(0)
        config, model, _ = load(config_path, overrides)
        if model.vae is not None:
            raise ValueError("the PyTorch side trains pixel-space models only (no VAE)")
        self.model = TorchSubjectDiffusion(os.path.join(folder, "export"))
        self.model.image_encoder.requires_grad_(False)
        parts = [self.model.unet, self.model.text_encoder, self.model.grounding]
        parts.append(self.model.cls_mlp)
        self.params = [p for part in parts for p in part.train().parameters()]
        train = config.train
        self.optimizer = torch.optim.AdamW(
            self.params, lr=train.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=True
        )
        self.clip_norm, self.ema_decay = train.clip_norm, config.loss.ema_decay
        self.ema = [p.detach().clone() for p in self.params]
        self.step = 0
        data = np.load(os.path.join(folder, "batch.npz"))
        self.batch = {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in data.files}
        for key in ("image", "refs", "loc"):  # NHWC -> NCHW
            self.batch[key] = self.batch[key].movedim(-1, -3)
        for key in ("ids", "placeholders"):
            self.batch[key] = self.batch[key].long()
        self.examples = train.batch_size
        return {"first_step_s": self.run(0, 1)["seconds"]}

    def loss(self):
        import torch

        m, b = self.model, self.batch
        x0 = b["image"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, m.scheduler.config.num_train_timesteps, (x0.shape[0],))
        x_t = m.scheduler.add_noise(x0, noise, t)
        with torch.no_grad():
            vision = m.image_encoder(b["refs"].flatten(0, 1))
        patches = vision.last_hidden_state[:, 1:].unflatten(0, b["refs"].shape[:2])
        cls = vision.image_embeds.unflatten(0, b["refs"].shape[:2])
        text_valid = b["valid"] & ~b["drop_text"][:, None]
        context = m.encode_prompt(b["ids"], m.cls_mlp(cls), b["placeholders"], text_valid)
        objs_valid = b["valid"] & ~b["drop_objs"][:, None]
        objs = m.grounding(patches, b["boxes"], objs_valid, b["use_box"])
        loc = b["loc"] * (~b["drop_loc"]).float()[:, None, None, None]
        out = m.unet(
            torch.cat([x_t, loc], 1), t, context, cross_attention_kwargs={"gligen": {"objs": objs}}
        ).sample
        epsilon = m.scheduler.config.prediction_type == "epsilon"
        target = noise if epsilon else m.scheduler.get_velocity(x0, noise, t)
        return torch.nn.functional.mse_loss(out, target)

    def train_step(self) -> float:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm, foreach=True)
        self.optimizer.step()
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))  # as ema_decay_at
        self.step += 1
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - decay)
        return loss.item()


def table_row(side: str, r: dict, torch_rate: float) -> list:
    setup = r["setup"]
    compiled = setup.get("compile")
    return [
        side,
        fmt(r["examples_per_s"]),
        f"{r['examples_per_s'] / torch_rate:.2f}x",
        "-" if compiled is None else f"{compiled['total']:.1f} ({compiled['compile']:.1f} XLA)",
        "-" if "init_s" not in setup else f"{setup['init_s']:.1f}",
        f"{setup['first_step_s']:.2f}",
        f"{r['peak_rss_mb']:.0f}",
        fmt(r["last_loss"], 4),
    ]


HEADERS = [
    "side",
    "examples/s",
    "vs torch",
    "compile s",
    "state init s",
    "1st step s",
    "peak RSS MB",
    "last loss",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model: validation only")
    parser.add_argument("--steps", type=int, help="steps per timed run (default 5; quick 2)")
    parser.add_argument("--repeats", type=int, help="timed runs per side (default 5; quick 2)")
    parser.add_argument(
        "--no-attn-row", action="store_true", help="skip the sdjax+attn row (quick skips it)"
    )
    parser.add_argument("--worker", choices=("sdjax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(SdjaxTrainer() if args.worker == "sdjax" else TorchTrainer())
        return
    facts = machine_facts()
    steps = args.steps or (2 if args.quick else 5)
    repeats = args.repeats or (2 if args.quick else 5)
    config_path = QUICK_CONFIG if args.quick else CONFIG
    skip_attn = args.no_attn_row or args.quick
    sides = {k: v for k, v in SIDES.items() if k != "sdjax+attn" or not skip_attn}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        prepare(folder, config_path)
        workers = {side: Worker(__file__, side.split("+")[0]) for side in sides}
        try:
            for side, worker in workers.items():
                print(f"setting up {side} ...", file=sys.stderr, flush=True)
                setup = worker.call(
                    "setup", folder=folder, config_path=config_path, overrides=sides[side]
                )
                results[side] = {"setup": setup}
            for side, replies in interleave(workers, repeats, steps=steps).items():
                rates = [r["examples_per_s"] for r in replies]
                results[side].update(
                    examples_per_s=median(rates), runs=rates, last_loss=replies[-1]["loss"]
                )
                results[side].update(workers[side].call("finish"))
        finally:
            for worker in workers.values():
                worker.close()
    torch_rate = results["torch"]["examples_per_s"]
    title = (
        f"Training on CPU: {os.path.relpath(config_path, ROOT)}, float32"
        f"{' (QUICK: validation only)' if args.quick else ''}"
    )
    rows = [table_row(side, r, torch_rate) for side, r in results.items()]
    report(
        [(title, HEADERS, rows)],
        {
            "bench": "train_cpu",
            "quick": args.quick,
            "config": config_path,
            "steps": steps,
            "repeats": repeats,
            "results": results,
            "machine": facts,
        },
    )


if __name__ == "__main__":
    main()
