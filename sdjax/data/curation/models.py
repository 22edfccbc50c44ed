"""transformers' BLIP-2, Grounding DINO and SAM as the curation pipeline's model steps.

Each adapter loads a model and its processor from a folder in `save_pretrained` layout
(`local_files_only`: nothing is ever downloaded; a `gs://` folder is copied once into the
local cache, `paths.cache_dir()`) and runs it in eval mode without gradients on `device`
("auto": the GPU when there is one) in `dtype` (float32, or bfloat16 / float16 on a GPU).
Each takes a batch: RGB PIL images; boxes float [N, 4] `(x1, y1, x2, y2)` in the image's
pixels; masks bool [N, H, W] at the image's size.

- `Blip2Captioner`: `Blip2ForConditionalGeneration`, captions the batch in one `generate`.
- `GroundingDinoDetector`: `GroundingDinoForObjectDetection` prompted with each image's
  nouns as "dog. ball. grass."; a query is kept when its best token probability passes the
  box threshold, and its label is the prompt's tokens that pass the text threshold
  (`grounded_detections`, the authors' `get_grounding_output`). One image per forward pass,
  as the authors run it: a padded batch would change the backbone's features at the
  padding's border, and the prompts differ per image.
- `SamSegmenter`: `SamModel`; the image encoder (most of SAM's compute) runs on the whole
  batch (each image is padded to the same square, so batching changes nothing), then the
  mask decoder per image with one box prompt per subject, single-mask output.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2Processor,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    SamModel,
    SamProcessor,
)

from sdjax import paths
from sdjax.data.curation.stages import Detections, check_model_folder
from sdjax.data.filters import BOX_THRESHOLD, TEXT_THRESHOLD, confident_boxes, label_tokens
from sdjax.errors import UserError


def torch_device(device: str = "auto") -> str:
    """'auto': 'cuda' when PyTorch sees a GPU, else 'cpu'; any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _local_folder(path: str) -> str:
    """The folder itself, or for gs:// a copy in the local cache (made once, renamed into place)."""
    if not paths.is_remote(path):
        return path
    digest = hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16]
    local = os.path.join(paths.cache_dir(), "models", digest)
    if not os.path.isdir(local):
        tmp = f"{local}.{uuid.uuid4().hex}.part"
        paths.download_tree(path, tmp)
        try:
            os.rename(tmp, local)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return local


def _load(model_class, processor_class, path: str, role: str, device: str, dtype: str):
    check_model_folder(path, role)
    try:
        folder = _local_folder(path)
        model = model_class.from_pretrained(
            folder, local_files_only=True, dtype=getattr(torch, dtype)
        )
        processor = processor_class.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, AttributeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise UserError(f"cannot load the {role} from {path}: {first_line}") from None
    return model.to(torch_device(device)).eval(), processor


class Blip2Captioner:
    """Captions with BLIP-2 (the authors' captioner), greedy unless `generate_kwargs` say.

    `generate_kwargs` go to `generate` (BLIP-2 hands them to its language model, which does
    not read the folder's generation config): e.g. `num_beams=3`, `min_new_tokens=5`.
    """

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        max_new_tokens: int = 30,
        dtype: str = "float32",
        **generate_kwargs,
    ):
        self.model, self.processor = _load(
            Blip2ForConditionalGeneration, Blip2Processor, path, "captioner", device, dtype
        )
        self.device = self.model.device
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, **generate_kwargs}

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        ids = self.model.generate(**inputs, **self.generate_kwargs)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def grounded_detections(
    probs: np.ndarray,
    boxes: np.ndarray,
    label_ids: list[int] | np.ndarray,
    decode: Callable[[list[int]], str],
    size: tuple[int, int],
    box_threshold: float = BOX_THRESHOLD,
    text_threshold: float = TEXT_THRESHOLD,
) -> Detections:
    """Thresholded detections from Grounding DINO's outputs for one image.

    probs float [Q, T]: sigmoid of the query-token logits over the prompt's T tokens;
    boxes float [Q, 4]: (cx, cy, w, h) in [0, 1]; label_ids [T]: the prompt's token ids, or
    -1 for tokens that never label (special tokens, the '.' separators); `decode` turns
    token ids into text; size (width, height) in pixels.
    """
    probs, boxes = np.asarray(probs, np.float64), np.asarray(boxes, np.float64)
    label_ids = np.asarray(label_ids)
    keep = confident_boxes(probs.max(axis=-1), box_threshold)
    width, height = size
    centre, extent = boxes[keep, :2], boxes[keep, 2:]
    corners = np.concatenate([centre - extent / 2, centre + extent / 2], axis=-1)
    labels = []
    for token_probs in probs[keep]:
        chosen = label_tokens(token_probs, text_threshold) & (label_ids >= 0)
        labels.append(decode(label_ids[chosen].tolist()).strip())
    return Detections(
        boxes=corners * np.asarray([width, height, width, height], np.float64),
        scores=probs[keep].max(axis=-1),
        labels=labels,
    )


class GroundingDinoDetector:
    """Boxes for the caption's nouns with Grounding DINO (docs/method.md §5: 0.25 / 0.2)."""

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        box_threshold: float = BOX_THRESHOLD,
        text_threshold: float = TEXT_THRESHOLD,
        dtype: str = "float32",
    ):
        # float32 weights, lower precision through autocast: transformers' Grounding DINO
        # makes float32 tensors inside, which a bfloat16 model refuses
        self.model, self.processor = _load(
            GroundingDinoForObjectDetection,
            GroundingDinoProcessor,
            path,
            "detector",
            device,
            "float32",
        )
        self.device = self.model.device
        self.autocast = getattr(torch, dtype)
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        tokenizer = self.processor.tokenizer
        separator = tokenizer.convert_tokens_to_ids(".")
        self._never_label = {*tokenizer.all_special_ids, separator}

    def __call__(self, images: list[Image.Image], nouns: list[list[str]]) -> list[Detections]:
        return [self.detect(image, words) for image, words in zip(images, nouns, strict=True)]

    @torch.inference_mode()
    def detect(self, image: Image.Image, nouns: list[str]) -> Detections:
        prompt = " ".join(f"{noun.strip().lower()}." for noun in nouns)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt").to(self.device)
        lower = self.autocast != torch.float32
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=lower):
            outputs = self.model(**inputs)
        ids = inputs["input_ids"][0].tolist()
        return grounded_detections(
            probs=outputs.logits[0, :, : len(ids)].sigmoid().float().cpu().numpy(),
            boxes=outputs.pred_boxes[0].float().cpu().numpy(),
            label_ids=[-1 if i in self._never_label else i for i in ids],
            decode=self.processor.tokenizer.decode,
            size=image.size,
            box_threshold=self.box_threshold,
            text_threshold=self.text_threshold,
        )


class SamSegmenter:
    """One mask per box with SAM (box prompts, single-mask output, as the authors)."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32"):
        self.model, self.processor = _load(SamModel, SamProcessor, path, "segmenter", device, dtype)
        self.device = self.model.device

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]:
        boxes = [np.asarray(b, np.float64).reshape(-1, 4) for b in boxes]
        masks = [np.zeros((0, im.height, im.width), bool) for im in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        if not todo:
            return masks
        inputs = self.processor(images=[images[i] for i in todo], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        embeddings = self.model.get_image_embeddings(pixels)
        for row, i in enumerate(todo):
            # the box prompt in the resized image's pixels, as SamProcessor scales it
            (old_h, old_w), (new_h, new_w) = (
                inputs["original_sizes"][row].tolist(),
                inputs["reshaped_input_sizes"][row].tolist(),
            )
            scaled = boxes[i] * np.asarray([new_w / old_w, new_h / old_h] * 2)
            outputs = self.model(
                image_embeddings=embeddings[row : row + 1],
                input_boxes=torch.as_tensor(
                    scaled[None], dtype=self.model.dtype, device=self.device
                ),
                multimask_output=False,
            )
            masks[i] = (
                self.processor.post_process_masks(
                    outputs.pred_masks.float().cpu(),
                    inputs["original_sizes"][row : row + 1],
                    inputs["reshaped_input_sizes"][row : row + 1],
                )[0][:, 0]  # [N, 1, H, W] -> [N, H, W]
                .numpy()
                .astype(bool)
            )
        return masks
