"""Curation model adapters on tiny random BLIP-2, Grounding DINO and SAM saved to disk.

No weights can be downloaded, so each test model is built from a tiny config, saved with
`save_pretrained` and loaded back through the adapter. Processors need tokenizer files:
BLIP-2's is a word-level tokenizer built with `tokenizers`, Grounding DINO's a BERT
WordPiece vocabulary written here.
"""

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sdjax.cli import main  # noqa: E402
from sdjax.data.curation import CurationConfig, Stages, curate_image  # noqa: E402
from sdjax.data.curation import models as M  # noqa: E402
from sdjax.data.records import encode_image, mask_array  # noqa: E402
from sdjax.data.shards import MANIFEST  # noqa: E402
from sdjax.errors import UserError  # noqa: E402

NOUNS = ["dog", "cat", "ball", "grass", "table", "tree", "hat", "cup", "car", "boat"]
WORDS = ["a", "on", "the", "with", "and", *NOUNS]


def tiny_models(root, varied: bool = False) -> dict[str, str]:
    """Tiny random BLIP-2, Grounding DINO and SAM folders under root, by role.

    `varied`: a captioner whose captions change with the image and hold several nouns
    (weights x10, no repeated word), so every stage after it has work to do."""
    torch.manual_seed(0)
    folders = {"captioner": "blip2", "detector": "gdino", "segmenter": "sam"}
    _blip2(root / "blip2", varied)
    _grounding_dino(root / "gdino")
    _sam(root / "sam")
    return {role: str(root / name) for role, name in folders.items()}


def _blip2(path, varied: bool = False) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token="</s>", eos_token="</s>", pad_token="<pad>"
    )
    image_processor = transformers.BlipImageProcessor(size={"height": 16, "width": 16})
    processor = transformers.Blip2Processor(image_processor, tokenizer, num_query_tokens=2)
    vocab_size = len(processor.tokenizer)  # with the <image> token the processor adds
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.Blip2Config(
        vision_config={**small, "intermediate_size": 16, "image_size": 16, "patch_size": 8},
        qformer_config={**small, "intermediate_size": 16, "encoder_hidden_size": 16},
        text_config=transformers.OPTConfig(
            **{**small, "ffn_dim": 16, "word_embed_proj_dim": 16, "vocab_size": vocab_size},
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,
            # read by BLIP-2's language model as its generation default
            no_repeat_ngram_size=1 if varied else 0,
        ).to_dict(),
        num_query_tokens=2,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = transformers.Blip2ForConditionalGeneration(config)
    if varied:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(10.0)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)


def _grounding_dino(path) -> None:
    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(path / "vocab.txt"))
    image_processor = transformers.GroundingDinoImageProcessor(
        size={"shortest_edge": 32, "longest_edge": 48}
    )
    config = transformers.GroundingDinoConfig(
        backbone_config=transformers.SwinConfig(
            image_size=32, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2,
            out_indices=[1, 2],
        ),
        text_config=transformers.BertConfig(
            vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=16, max_position_embeddings=32,
        ),
        num_queries=6, encoder_layers=1, decoder_layers=1, d_model=32, encoder_ffn_dim=16,
        decoder_ffn_dim=16, encoder_attention_heads=2, decoder_attention_heads=2,
        num_feature_levels=2, encoder_n_points=2, decoder_n_points=2, max_text_len=32,
    )  # fmt: skip
    transformers.GroundingDinoForObjectDetection(config).save_pretrained(
        path, safe_serialization=True
    )
    transformers.GroundingDinoProcessor(image_processor, tokenizer).save_pretrained(path)


def _sam(path) -> None:
    config = transformers.SamConfig(
        vision_config=dict(
            hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
            image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1],
            num_pos_feats=4, mlp_dim=16,
        ),
        prompt_encoder_config=dict(hidden_size=8, image_size=64, patch_size=8),
        mask_decoder_config=dict(
            hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2,
            iou_head_hidden_dim=8,
        ),
    )  # fmt: skip
    image_processor = transformers.SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}
    )
    transformers.SamModel(config).save_pretrained(path, safe_serialization=True)
    transformers.SamProcessor(image_processor).save_pretrained(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for name, build in [("blip2", _blip2), ("gdino", _grounding_dino), ("sam", _sam)]:
        build(root / name)
    return root


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))


def test_blip2_captions_a_batch(model_dirs):
    # random weights may end at once: min_new_tokens shows generate's options reach the model
    captioner = M.Blip2Captioner(str(model_dirs / "blip2"), max_new_tokens=6, min_new_tokens=4)
    captions = captioner([IMAGE, IMAGE.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    for caption in captions:
        words = caption.split()
        assert 4 <= len(words) <= 6 and set(words) <= set(WORDS)


def test_grounding_dino_detects_with_thresholds(model_dirs):
    path = str(model_dirs / "gdino")
    found = M.GroundingDinoDetector(path).detect(IMAGE, ["dog", "cat", "ball"])
    assert (
        found.boxes.shape == (len(found.labels), 4) and found.scores.shape == found.boxes.shape[:1]
    )
    assert (found.scores > 0.25).all()
    every = M.GroundingDinoDetector(path, box_threshold=0.0, text_threshold=0.0)
    everything, again = every([IMAGE, IMAGE], [["dog", "cat", "ball"], ["dog", "cat", "ball"]])
    np.testing.assert_array_equal(everything.boxes, again.boxes)  # one image per pass
    assert len(everything.labels) == 6  # every query
    assert all(set(label.split()) <= {"dog", "cat", "ball"} for label in everything.labels)
    assert set(np.round(found.scores, 6)) <= set(np.round(everything.scores, 6))
    assert len(M.GroundingDinoDetector(path, box_threshold=1.0).detect(IMAGE, ["dog"]).labels) == 0


def test_grounded_detections_thresholds_and_labels():
    # tokens: [CLS] dog . cat . [SEP] -> ids 2 10 5 11 5 3; only dog and cat may label
    ids = [-1, 10, -1, 11, -1, -1]
    probs = np.array(
        [
            [0.9, 0.3, 0.9, 0.1, 0.9, 0.9],  # box score 0.9; label: dog
            [0.1, 0.25, 0.1, 0.2, 0.1, 0.1],  # box score exactly 0.25: dropped
            [0.0, 0.3, 0.0, 0.21, 0.0, 0.4],  # box score 0.4 ([SEP]); label: dog cat
        ]
    )
    boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 1, 1], [0.25, 0.75, 0.5, 0.5]])
    names = {10: "dog", 11: "cat"}
    found = M.grounded_detections(
        probs, boxes, ids, lambda t: " ".join(names[i] for i in t), size=(100, 50)
    )
    assert found.labels == ["dog", "dog cat"]
    assert found.scores.tolist() == [0.9, 0.4]
    np.testing.assert_allclose(found.boxes, [[40, 15, 60, 35], [0, 25, 50, 50]])


def test_sam_segments_each_box(model_dirs):
    segmenter = M.SamSegmenter(str(model_dirs / "sam"))
    other = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 36, 3), dtype=np.uint8))
    boxes = [np.array([[2, 3, 20, 25], [10, 5, 45, 28]], float), np.array([[1, 2, 30, 33]], float)]
    masks = segmenter([IMAGE, other], boxes)
    assert masks[0].shape == (2, 30, 50) and masks[1].shape == (1, 40, 36)
    assert masks[0].dtype == bool
    # the batched encoder and our box scaling agree with SamProcessor's one-image path
    with torch.inference_mode():
        for image, box, batched in zip([IMAGE, other], boxes, masks):
            inputs = segmenter.processor(
                images=image, input_boxes=[box.tolist()], return_tensors="pt"
            )
            out = segmenter.model(**inputs, multimask_output=False)
            alone = segmenter.processor.post_process_masks(
                out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )[0][:, 0].numpy()
            assert (alone == batched).mean() > 0.999
    empty = segmenter([IMAGE, other], [np.zeros((0, 4)), boxes[1]])
    assert empty[0].shape == (0, 30, 50) and empty[1].shape == (1, 40, 36)


def test_adapters_refuse_missing_or_broken_folders(model_dirs, tmp_path):
    with pytest.raises(UserError, match="segmenter model folder .* does not exist"):
        M.SamSegmenter(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load the captioner"):
        M.Blip2Captioner(str(tmp_path))


def test_detector_and_segmenter_in_the_pipeline(model_dirs):
    detector = M.GroundingDinoDetector(str(model_dirs / "gdino"), box_threshold=0, text_threshold=0)
    stages = Stages(
        captioner=None, detector=detector, segmenter=M.SamSegmenter(str(model_dirs / "sam"))
    )
    data = encode_image(np.asarray(IMAGE))
    config = CurationConfig(filters=None)
    record, reasons = curate_image("x", IMAGE, data, "a dog and a cat with a ball", stages, config)
    assert set(reasons) <= {"nms"} and len(record.subjects) == 6 - len(reasons) >= 1
    for subject in record.subjects:
        assert mask_array(subject).shape == (30, 50) and subject.score >= 0
        assert set(subject.label.split()) == {"dog", "cat", "ball"}
    assert record.attributes == {"nouns": "dog,cat,ball"}


def test_cli_curate_runs_the_models(model_dirs, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(images / "small.png")
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (600, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    roles = {"captioner": "blip2", "detector": "gdino", "segmenter": "sam"}
    models = [f"--{role}={model_dirs / name}" for role, name in roles.items()]
    out = tmp_path / "out"
    argv = ["data", "curate", str(images), "--out", str(out), *models, "--chunk-size", "2"]
    assert main([*argv, "--no-filter"]) == 0
    lines = capsys.readouterr().out.splitlines()
    manifest = json.loads((out / MANIFEST).read_text())
    report = manifest["provenance"]["report"]
    assert report["images_seen"] == 3 and report["dropped_images"]["short_side"] == 1
    assert set(report["dropped_images"]) <= {"short_side", "noun_count", "detection_count"}
    assert (
        lines[0] == f"kept {report['images_kept']} of 3 images, {report['subjects_kept']} subjects"
    )
    assert manifest["provenance"]["models"]["detector"] == str(model_dirs / "gdino")


def test_adapters_run_in_bfloat16(model_dirs):
    """--dtype bfloat16 (GPU workers): BLIP-2 and SAM in bfloat16, Grounding DINO autocast."""
    image = IMAGE.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    captioner = M.Blip2Captioner(str(model_dirs / "blip2"), dtype="bfloat16", max_new_tokens=3)
    assert captioner.model.dtype == torch.bfloat16 and len(captioner([IMAGE, image])) == 2
    detector = M.GroundingDinoDetector(
        str(model_dirs / "gdino"), dtype="bfloat16", box_threshold=0, text_threshold=0
    )
    found = detector([IMAGE], [["dog", "cat"]])[0]
    assert len(found.labels) == 6 and found.boxes.dtype == np.float64
    masks = M.SamSegmenter(str(model_dirs / "sam"), dtype="bfloat16")([IMAGE], [found.boxes[:2]])
    assert masks[0].shape == (2, 30, 50) and masks[0].dtype == bool
