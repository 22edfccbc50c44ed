"""Curation: the single-process runner against Apache Beam's DirectRunner, and a GPU projection.

    python bench/curate.py [--images 300] [--workers 2] [--json OUT.json] [--no-flops]

1. Input: N JPEG photos-to-be (640 x 720, coloured rectangles on noise, fixed seed) in a
   folder; tiny random BLIP-2 / Grounding DINO / SAM saved in their real formats
   (`tests/test_curation_models.tiny_models`, the captioner made to give varied captions so
   every stage has work); `--no-filter` settings (every detection kept: more records to
   compare), chunk 32, batch 8.
2. The same curation by `sdjax.data.curation.local` (one process) and by the Beam pipeline
   on the DirectRunner with `--workers` processes; wall time, images/s and records/s, the
   per-step seconds (the single process's clock; Beam's `sdjax.curate` metrics, summed over
   workers), and whether the two outputs are equal file for file.
3. Per-image FLOPs of the real models, counted by PyTorch's FlopCounterMode on their real
   architectures (random weights): BLIP-2 OPT-2.7b (ViT-g 224 px, Q-Former, the language
   model over 32 query + 20 caption tokens), Grounding DINO Swin-T (800 x 1067 px, a 12-token
   prompt), SAM ViT-H (1024 px encoder, decoder for 4 boxes); and from them a PROJECTED
   throughput and cost on a stated GPU worker (assumptions printed with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The projection's worker (stated, not measured): a Dataflow / GCE g2-standard-8 with one
# NVIDIA L4: 121 TFLOP/s dense bf16, 300 GB/s memory, 24 GB.
GPU = {
    "name": "NVIDIA L4 (g2-standard-8)",
    "bf16_tflops": 121.0,
    "memory_gb_s": 300.0,
    "dollars_per_hour": 0.85,  # on-demand list price as recalled; use your own
    "utilisation": 0.4,  # of peak FLOP/s for the vision encoders, batched
    "bandwidth_utilisation": 0.8,  # for the captioner's token-by-token decoding
}
CAPTION_TOKENS = 20
BATCH = 16


def make_images(folder: str, n: int) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    for i in range(n):
        pixels = rng.integers(0, 256, (720, 640, 3), dtype=np.uint8)
        for _ in range(3):
            x, y = rng.integers(0, 480), rng.integers(0, 560)
            pixels[y : y + 160, x : x + 160] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)


def _files(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def run_both(work: str, n: int, workers: int) -> dict:
    import functools

    from sdjax.data.curation import beam, local, models, sources
    from sdjax.data.curation.stages import CurationConfig, StageClock, Stages

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import pathlib

    from test_curation_models import tiny_models

    folders = tiny_models(pathlib.Path(work) / "models", varied=True)
    make_images(os.path.join(work, "images"), n)
    config = CurationConfig(chunk_size=32, batch_size=8, filters=None)
    units, described = sources.input_units([os.path.join(work, "images")], config.chunk_size)
    classes = {
        "captioner": models.Blip2Captioner,
        "detector": models.GroundingDinoDetector,
        "segmenter": models.SamSegmenter,
    }
    factories = {
        role: functools.partial(cls, folders[role], device="cpu") for role, cls in classes.items()
    }
    rows = {}
    for runner in ("single process", f"Beam DirectRunner, {workers} workers"):
        out, clock = os.path.join(work, runner.split()[0].lower()), StageClock()
        start = time.perf_counter()
        if runner == "single process":
            built = Stages(**{role: make() for role, make in factories.items()})
            report = local.curate_units(units, described, built, out, config, clock=clock)
        else:
            options = [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
            report = beam.curate_units(
                units, described, beam.ModelSteps(**factories), out, config, options, clock=clock
            )
        seconds = time.perf_counter() - start
        rows[runner] = {
            "out": out,
            "seconds": seconds,
            "images": report.images_seen,
            "records": report.images_kept,
            "report": report.as_dict(),
            "step_seconds": clock.seconds,
            "step_images": clock.images,
        }
    outs = [row.pop("out") for row in rows.values()]
    files = [_files(out) for out in outs]
    return {
        "rows": rows,
        "equal": files[0] == files[1],
        "files": len(files[0]),
        "config": dataclasses.asdict(config),
    }


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def model_tflops() -> dict:
    """TFLOP per image of each real-size model (forward), counted on random weights."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    blip2 = transformers.Blip2Config(
        vision_config=dict(
            hidden_size=1408,
            intermediate_size=6144,
            num_hidden_layers=39,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            qkv_bias=True,
        ),
        qformer_config=dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            cross_attention_frequency=2,
            encoder_hidden_size=1408,
        ),
        text_config=transformers.OPTConfig(
            hidden_size=2560,
            num_hidden_layers=32,
            num_attention_heads=32,
            ffn_dim=10240,
            vocab_size=50272,
            word_embed_proj_dim=2560,
        ).to_dict(),
        num_query_tokens=32,
    )  # fmt: skip  (Salesforce/blip2-opt-2.7b)
    sam = transformers.SamConfig(
        vision_config=dict(
            hidden_size=1280,
            num_hidden_layers=32,
            num_attention_heads=16,
            mlp_dim=5120,
            global_attn_indexes=[7, 15, 23, 31],
            output_channels=256,
            image_size=1024,
            patch_size=16,
            window_size=14,
        )
    )  # fmt: skip  (facebook/sam-vit-huge)
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        captioner = transformers.Blip2ForConditionalGeneration(blip2).eval()
        segmenter = transformers.SamModel(sam).eval()
    captioner.language_model.config._attn_implementation = "eager"  # no data-dependent mask
    lm_bytes = 2 * sum(p.numel() for p in captioner.language_model.parameters())  # bf16
    with torch.device("meta"):
        caption = (
            _count(lambda: captioner.vision_model(pixel_values=torch.empty(1, 3, 224, 224)))
            + _count(
                lambda: captioner.qformer(
                    query_embeds=torch.empty(1, 32, 768),
                    encoder_hidden_states=torch.empty(1, 257, 1408),
                )
            )
            + _count(
                lambda: captioner.language_model(
                    inputs_embeds=torch.empty(1, 32 + CAPTION_TOKENS, 2560)
                )
            )
        )
        segment = _count(lambda: segmenter.vision_encoder(torch.empty(1, 3, 1024, 1024)))
        segment += _count(
            lambda: segmenter(
                image_embeddings=torch.empty(1, 256, 64, 64),
                input_boxes=torch.empty(1, 4, 4),
                multimask_output=False,
            )
        )
    # Grounding DINO's deformable attention reads its level shapes: a real forward pass.
    detector = transformers.GroundingDinoForObjectDetection(transformers.GroundingDinoConfig())
    ids = torch.tensor([[101, *range(2000, 2010), 102]])
    with torch.no_grad():
        detect = _count(
            lambda: detector.eval()(
                pixel_values=torch.randn(1, 3, 800, 1067),
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                token_type_ids=torch.zeros_like(ids),
                pixel_mask=torch.ones(1, 800, 1067, dtype=torch.long),
            )
        )
    return {"caption": caption, "detect": detect, "segment": segment, "lm_bf16_bytes": lm_bytes}


def projection(tflops: dict) -> dict:
    """Seconds per image and dollars per million images on `GPU`, every image through all
    three models (an upper bound: the filters stop some images before detection or SAM)."""
    compute = (tflops["caption"] + tflops["detect"] + tflops["segment"]) / (
        GPU["bf16_tflops"] * GPU["utilisation"]
    )
    # Greedy decoding reads the language model's weights once per token for the whole batch.
    decode = (
        tflops["lm_bf16_bytes"]
        * CAPTION_TOKENS
        / BATCH
        / (GPU["memory_gb_s"] * 1e9 * GPU["bandwidth_utilisation"])
    )
    seconds = compute + decode
    hours = 1e6 * seconds / 3600
    return {
        "seconds_per_image": seconds,
        "compute_seconds": compute,
        "decode_seconds": decode,
        "images_per_hour": 3600 / seconds,
        "worker_hours_per_million": hours,
        "dollars_per_million": hours * GPU["dollars_per_hour"],
    }


def report(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "| runner | wall s | images/s | records/s | " + " | ".join(STEPS) + " |",
        "|---" * (4 + len(STEPS)) + "|",
    ]
    for name, row in rows.items():
        steps = " | ".join(f"{row['step_seconds'][s]:.2f}" for s in STEPS)
        lines.append(
            f"| {name} | {row['seconds']:.1f} | {row['images'] / row['seconds']:.2f} | "
            f"{row['records'] / row['seconds']:.2f} | {steps} |"
        )
    first = next(iter(rows.values()))
    lines += [
        "",
        f"images {first['images']}, records {first['records']}; "
        f"report {json.dumps(first['report'])}",
        f"outputs equal file for file ({result['files']} files): {result['equal']}",
    ]
    if "tflops" in result:
        t, p = result["tflops"], result["projection"]
        lines += [
            "",
            f"TFLOP per image: caption {t['caption']:.3f}, detect {t['detect']:.3f}, "
            f"segment {t['segment']:.3f}; language model {t['lm_bf16_bytes'] / 1e9:.2f} GB bf16",
            f"PROJECTION on {GPU['name']} ({GPU['bf16_tflops']:.0f} TFLOP/s bf16 at "
            f"{GPU['utilisation']:.0%}, {GPU['memory_gb_s']:.0f} GB/s at "
            f"{GPU['bandwidth_utilisation']:.0%}, batch {BATCH}, {CAPTION_TOKENS} caption tokens, "
            f"${GPU['dollars_per_hour']}/h): {p['seconds_per_image'] * 1e3:.0f} ms per image "
            f"({p['compute_seconds'] * 1e3:.0f} compute + {p['decode_seconds'] * 1e3:.0f} decode), "
            f"{p['worker_hours_per_million']:.0f} worker-hours and "
            f"${p['dollars_per_million']:.0f} per million images",
        ]
    return "\n".join(lines)


STEPS = ("read", "load", "caption", "nouns", "detect", "select", "segment", "record", "write")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--no-flops", action="store_true", help="skip the real-size FLOP count")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdjax-bench-curate-") as work:
        result = run_both(work, args.images, args.workers)
    if not args.no_flops:
        result["tflops"] = model_tflops()
        result["projection"] = projection(result["tflops"])
        result["gpu"] = GPU
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
