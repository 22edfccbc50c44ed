"""Records per second of the training input pipeline (`sdjax.data.loader`) on this machine.

Two workloads, each at 0 and 2 grain worker processes:
  toy-64   64 px toy-world scenes (PNG) at the toy model's settings: 32 px output,
           3 subject slots, 32 px references, 40 tokens (configs/toy.py)
  jpeg-512 512 px toy-world scenes stored as JPEG (q95) at SD 2-base settings: 512 px
           output, 64 px masks, 2 subject slots, 224 px references, 77 tokens

    python bench/loader.py [--batches N]

Timing starts once the pipeline's read-ahead buffers have drained (the first batches of a
run wait for worker start-up and then come from buffers filled meanwhile).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time

from sdjax.data import toy
from sdjax.data.loader import LoaderConfig, make_loader
from sdjax.data.records import encode_image, image_array
from sdjax.data.shards import ShardWriter
from sdjax.models.clip import CLIPTextConfig, CLIPVisionConfig
from sdjax.models.unet_config import UNetConfig
from sdjax.models.vae import VAEConfig
from sdjax.subject_diffusion import ModelConfig
from sdjax.tokenizer import Tokenizer

WORKERS = (0, 2)


def toy_model() -> ModelConfig:
    return ModelConfig(
        unet=UNetConfig(in_channels=4, out_channels=3),
        text=CLIPTextConfig(max_position_embeddings=40),
        image=CLIPVisionConfig(image_size=32, patch_size=8),
        resolution=32,
        max_subjects=3,
    )


def sd2_model() -> ModelConfig:
    vae = VAEConfig(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
    )
    return ModelConfig(
        unet=UNetConfig(in_channels=5, out_channels=4),
        text=CLIPTextConfig(),
        image=CLIPVisionConfig(image_size=224),
        vae=vae,
        resolution=512,
        max_subjects=2,
    )


def write_scenes(out_dir: str, n: int, size: int, jpeg: bool) -> str:
    world = toy.ToyWorld(size=size)
    with ShardWriter(out_dir, records_per_shard=256) as writer:
        for record in toy.generate(world, n):
            if jpeg:
                image = encode_image(image_array(record), "JPEG", quality=95)
                record = dataclasses.replace(record, image=image)
            writer.write(record)
    return out_dir


def records_per_second(path, model, batch_size, workers, batches) -> float:
    config = LoaderConfig.from_dict({"path": path, "describe_prob": 0.5})
    tokenizer = Tokenizer(max_length=model.text.max_position_embeddings)
    loader = make_loader(
        config,
        model,
        tokenizer,
        batch_size=batch_size,
        seed=0,
        process_index=0,
        process_count=1,
        worker_count=workers,
    )
    buffered = config.prefetch_buffer * max(1, workers) + workers * batch_size
    with loader:
        for _ in range(1 + math.ceil(buffered / batch_size)):
            next(loader)
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        elapsed = time.perf_counter() - start
    return batches * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=24, help="timed batches per run")
    args = parser.parse_args()
    workloads = [
        ("toy-64", 64, False, toy_model(), 32, 1024),
        ("jpeg-512", 512, True, sd2_model(), 8, 256),
    ]
    print(f"{'workload':<10} {'batch':>5} {'workers':>7} {'records/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, jpeg, model, batch_size, scenes in workloads:
            path = write_scenes(os.path.join(tmp, name), scenes, size, jpeg)
            for workers in WORKERS:
                rate = records_per_second(path, model, batch_size, workers, args.batches)
                print(f"{name:<10} {batch_size:>5} {workers:>7} {rate:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
