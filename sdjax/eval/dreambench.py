"""DreamBench evaluation (docs/method.md §7): `sdjax eval dreambench` generates images of
DreamBench's subjects with a pipeline and scores them with DINO, CLIP-I and CLIP-T,
resumably.

Protocol (choices marked * are ours, where DreamBench leaves them open):
- Data: the `dataset/` folder of google's dreambooth repository: one folder of 4-6 photos
  per subject and `prompts_and_classes.txt` (subject -> class noun; 25 object and 25 live
  prompt templates `'a {0} {1} on the beach'.format(unique_token, class_token)`).
- Live subjects are DreamBench's cats and dogs (9 of 30); they get the live prompts.
- Prompt: the template with the class noun and no unique token ("a dog on the beach"). It
  is both the sampler's caption and CLIP-T's text; the subject's label is the class noun.
- *Reference: the subject's first photo in name order (`00.jpg`), the whole image (no
  mask) unless `--masks DIR` holds `DIR/<subject>.png`; boxes are the sampler's automatic
  ones (from the references' aspect ratios), recorded per prompt.
- Scores of a generated image: DINO (CLS features) and CLIP-I, the mean cosine similarity
  with ALL the subject's photos (the reference among them, as DreamBench compares with the
  whole real set); CLIP-T, the cosine similarity with the prompt. Averaged per prompt
  over its images, per subject over its prompts, overall over subjects.
- Images: `--images-per-prompt` (6) per prompt in one sampler batch, seed `task_seed`
  (SHA-256 of run seed, mode, subject, prompt index): an image does not depend on which
  other prompts run, and `sdjax sample --seed S --num-images 6` reproduces it.
- *Two subjects (`--pairs`): the 30 pairs and 10 prompts ("a {0} and a {1} on the beach",
  both class nouns) of `sdjax.eval.dreambench_data` (PAIRS, PAIR_TEMPLATES). DINO and
  CLIP-I of an image are the mean over its two subjects of its score against that
  subject's photos.

Output folder: `run.json` (the settings; a rerun must match them), `results.jsonl` (one
line per finished prompt: per-image scores, seed, boxes, image paths),
`images/<name>/<prompt>_<k>.png` (name: the subject, or "a+b" for a pair) and
`references/<subject>.jpg`; `sdjax.eval.report` writes the tables (`single.md/json`,
`pairs.md/json`) and `report/index.html`. A rerun skips finished prompts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

from sdjax.errors import UserError
from sdjax.eval.dreambench_data import (
    Bench,
    Task,
    make_tasks,
    read_bench,
    select_subjects,
    task_seed,
)

RESULTS, SETTINGS = "results.jsonl", "run.json"


@dataclass(frozen=True)
class Settings:
    """What a run's numbers depend on; stored in run.json, a rerun must match it."""

    checkpoint: str | None  # None: the embedded default model
    dino: str
    clip_b32: str
    clip_l14: str | None
    masks: str | None
    seed: int
    steps: int
    images_per_prompt: int
    text_scale: float
    image_scale: float
    subject_fraction: float
    open_clip_act: str


def check_resumable(out: str, settings: Settings) -> None:
    """Refuse to resume a folder whose run used other settings."""
    path = os.path.join(out, SETTINGS)
    if not os.path.isfile(path):
        return
    from sdjax.convert.files import read_json

    old = read_json(path)
    for key, value in asdict(settings).items():
        if old.get(key) != value:
            raise UserError(
                f"{out} holds a run with {key}={old.get(key)!r}, not {value!r}: "
                "use another --out or the same settings"
            )


def read_results(out: str) -> list[dict]:
    """The finished prompts' records (a line torn by a killed run is ignored)."""
    path = os.path.join(out, RESULTS)
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data[: data.rfind(b"\n") + 1].splitlines()
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except ValueError as err:
        raise UserError(f"{path} is damaged ({err}); remove the bad line to resume") from None


def cut_torn_line(out: str) -> None:
    """Drop a last line a killed run left half-written, so appending stays line-aligned."""
    path = os.path.join(out, RESULTS)
    if os.path.isfile(path):
        with open(path, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)


def append_result(out: str, record: dict) -> None:
    """Append one finished prompt's record, on disk before the next prompt starts."""
    with open(os.path.join(out, RESULTS), "ab") as f:
        f.write(json.dumps(record).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


class Scorer:
    """DINO, CLIP-I and CLIP-T of generated images; real-photo features cached per subject.

    clips: score-key suffix ("" for B/32, "_l14") -> (CLIP model, its tokenizer).
    """

    def __init__(self, dino, clips: dict):
        self.dino, self.clips = dino, clips
        self._real: dict[tuple, object] = {}

    def _reals(self, key: str, extract, model, photos: list[list[str]]):
        wanted = [(key, tuple(paths)) for paths in photos]
        for k in wanted:
            if k not in self._real:
                self._real[k] = extract(model, list(k[1]))
        return [self._real[k] for k in wanted]

    def score(self, images, photos: list[list[str]], prompt: str) -> dict[str, list[float]]:
        """Per-image scores of `images` (PIL) against each subject's `photos`."""
        from sdjax.eval.similarity import (
            clip_image_features,
            clip_text_features,
            dino_features,
            mean_paired_cosine,
        )

        gen = dino_features(self.dino, images)
        scores = {"dino": _similarity(gen, self._reals("dino", dino_features, self.dino, photos))}
        for suffix, (model, tokenizer) in self.clips.items():
            gen = clip_image_features(model, images)
            reals = self._reals("clip" + suffix, clip_image_features, model, photos)
            text = clip_text_features(model, tokenizer.plain(prompt)[None])
            scores["clip_i" + suffix] = _similarity(gen, reals)
            scores["clip_t" + suffix] = [mean_paired_cosine(g[None], text) for g in gen]
        return scores


def _similarity(gen, reals) -> list[float]:
    """Per generated image: the mean over subjects of its mean cosine with their photos."""
    import numpy as np

    from sdjax.eval.similarity import mean_pairwise_cosine

    return [float(np.mean([mean_pairwise_cosine(g[None], r) for r in reals])) for g in gen]


def load_scorer(settings: Settings) -> Scorer:
    from sdjax.eval.metric_models import load_dino

    clips = {"": _load_clip(settings.clip_b32, settings.open_clip_act)}
    if settings.clip_l14:
        clips["_l14"] = _load_clip(settings.clip_l14, settings.open_clip_act)
    return Scorer(load_dino(settings.dino), clips)


def _load_clip(path: str, act: str):
    """(CLIP model, tokenizer): a folder's own vocab.json/merges.txt, else CLIP's BPE."""
    from sdjax.eval.metric_models import load_clip
    from sdjax.tokenizer import Tokenizer

    model = load_clip(path) if os.path.isdir(path) else load_clip(path, act=act)
    text = model[0].text
    own = os.path.isfile(os.path.join(path, "vocab.json"))
    tokenizer = Tokenizer(folder=path if own else None, max_length=text.max_position_embeddings)
    if tokenizer.vocab_size > text.vocab_size:
        raise UserError(
            f"{path}: the text tower has {text.vocab_size} token embeddings, fewer than "
            f"CLIP's {tokenizer.vocab_size} tokens"
        )
    return model, tokenizer


def run_task(pipeline, scorer: Scorer, bench: Bench, task: Task, out: str, settings: Settings):
    """Generate, save and score one task's images -> its results.jsonl record."""
    from sdjax.sampling import Subject, prepare_inputs, sample

    subjects = [
        Subject(bench.reference(s), bench.classes[s], _mask(settings.masks, s))
        for s in task.subjects
    ]
    seed = task_seed(settings.seed, task)
    images = sample(
        pipeline,
        task.prompt,
        subjects,
        seed=seed,
        num_steps=settings.steps,
        text_scale=settings.text_scale,
        image_scale=settings.image_scale,
        num_images=settings.images_per_prompt,
        subject_fraction=settings.subject_fraction,
    )
    boxes = prepare_inputs(pipeline, task.prompt, subjects)["boxes"][: len(subjects)]
    os.makedirs(os.path.join(out, "images", task.name), exist_ok=True)
    paths = [f"images/{task.name}/{task.prompt_index:02d}_{k}.png" for k in range(len(images))]
    for image, path in zip(images, paths):
        image.save(os.path.join(out, path))
    return {
        "mode": task.mode,
        "name": task.name,
        "subjects": list(task.subjects),
        "labels": [s.label for s in subjects],
        "prompt_index": task.prompt_index,
        "prompt": task.prompt,
        "seed": seed,
        "boxes": boxes.round(4).tolist(),
        "images": paths,
        "references": [_copy_reference(bench, s, out) for s in task.subjects],
        "scores": scorer.score(images, [bench.photos(s) for s in task.subjects], task.prompt),
    }


def _mask(masks: str | None, subject: str) -> str | None:
    path = os.path.join(masks, subject + ".png") if masks else None
    return path if path and os.path.isfile(path) else None


def _copy_reference(bench: Bench, subject: str, out: str) -> str:
    """The reference photo, copied into OUT/references so the page does not need the data."""
    source = bench.reference(subject)
    path = f"references/{subject}{os.path.splitext(source)[1].lower()}"
    if not os.path.isfile(os.path.join(out, path)):
        os.makedirs(os.path.join(out, "references"), exist_ok=True)
        shutil.copyfile(source, os.path.join(out, path))
    return path


def evaluate(pipeline, scorer: Scorer, bench: Bench, tasks: list[Task], out: str, settings):
    """Run the tasks not yet in OUT/results.jsonl, appending each record -> how many ran."""
    from tqdm import tqdm

    cut_torn_line(out)
    done = {(r["mode"], r["name"], r["prompt_index"]) for r in read_results(out)}
    todo = [t for t in tasks if t.key not in done]
    with tqdm(todo, unit="prompt", desc="dreambench", dynamic_ncols=True, disable=None) as bar:
        for task in bar:
            bar.set_postfix_str(f"{task.mode} {task.name}", refresh=False)
            append_result(out, run_task(pipeline, scorer, bench, task, out, settings))
    return len(todo)


def run_benchmark(
    data: str,
    out: str,
    settings: Settings,
    subjects: str | None = None,
    prompts_per_subject: int | None = None,
    pairs: bool = False,
) -> tuple[int, int]:
    """Generate and score DreamBench (`data`: its dataset/ folder) into `out`, resuming
    what a run with the same settings left -> (prompts run now, prompts in all)."""
    bench = read_bench(data)
    tasks = make_tasks(bench, select_subjects(bench, subjects), prompts_per_subject, pairs)
    for subject in {s for t in tasks for s in t.subjects}:
        bench.photos(subject)  # every subject has photos, before anything slow
    check_resumable(out, settings)
    from sdjax.convert.files import write_json
    from sdjax.pipeline import load_pipeline

    pipeline = load_pipeline(settings.checkpoint)
    scorer = load_scorer(settings)
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, SETTINGS), asdict(settings))
    return evaluate(pipeline, scorer, bench, tasks, out, settings), len(tasks)
