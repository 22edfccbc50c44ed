"""DreamBench's data and protocol: subjects, class nouns, prompts, the two-subject pairs,
and the evaluation's units of work (`Task`) with their seeds.

`prompts_and_classes.txt` (google's dreambooth `dataset/`) holds a `subject_name,class`
table and two Python-style prompt lists, under "Object Prompts" and "Live Subject
Prompts", of lines `'a {0} {1} on the beach'.format(unique_token, class_token),`. Each
subject folder holds its 4-6 photos.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from sdjax.errors import UserError

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"cat", "dog"})
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")

# The ten scene prompts DreamBench gives both objects and live subjects, for two subjects.
PAIR_TEMPLATES = tuple(
    "a {0} and a {1} " + scene
    for scene in (
        "in the jungle",
        "in the snow",
        "on the beach",
        "on a cobblestone street",
        "on top of pink fabric",
        "on top of a wooden floor",
        "with a city in the background",
        "with a mountain in the background",
        "with a blue house in the background",
        "on top of a purple rug in a forest",
    )
)
# The 30 pairs (10 object+object, 10 pet+pet, 10 pet+object). Object pairs use 20 of the 21
# objects once each, two class nouns per pair; pink_sunglasses ("a glasses") is left out.
# Pet pairs are mostly cat+dog; three share a class noun (cat+cat2, dog+dog2, dog5+dog8),
# the hard case where the labels cannot tell the subjects apart.
OBJECT_PAIRS = (
    ("backpack", "vase"),
    ("berry_bowl", "teapot"),
    ("can", "candle"),
    ("clock", "bear_plushie"),
    ("colorful_sneaker", "duck_toy"),
    ("fancy_boot", "monster_toy"),
    ("grey_sloth_plushie", "rc_car"),
    ("poop_emoji", "red_cartoon"),
    ("robot_toy", "shiny_sneaker"),
    ("wolf_plushie", "backpack_dog"),
)
PET_PAIRS = (
    ("cat", "dog"),
    ("cat2", "dog2"),
    ("cat", "dog3"),
    ("cat2", "dog5"),
    ("cat", "dog6"),
    ("cat2", "dog7"),
    ("cat", "dog8"),
    ("cat", "cat2"),
    ("dog", "dog2"),
    ("dog5", "dog8"),
)
PET_OBJECT_PAIRS = (
    ("cat", "berry_bowl"),
    ("cat2", "candle"),
    ("dog", "backpack"),
    ("dog2", "bear_plushie"),
    ("dog3", "rc_car"),
    ("dog5", "vase"),
    ("dog6", "duck_toy"),
    ("dog7", "shiny_sneaker"),
    ("dog8", "teapot"),
    ("cat", "robot_toy"),
)
PAIRS = OBJECT_PAIRS + PET_PAIRS + PET_OBJECT_PAIRS

_CLASS_LINE = re.compile(r"^([a-z0-9_]+),([a-z ]+)$")
_PROMPT_LINE = re.compile(r"^'(.*)'\.format\(unique_token, class_token\),?$")
_PROMPT_LISTS = {"Object Prompts": "object", "Live Subject Prompts": "live"}


def fill(template: str, *words: str) -> str:
    """A template with its slots filled, spaces collapsed ('a {0} {1}', '', 'dog' -> 'a dog')."""
    return " ".join(template.format(*words).split())


@dataclass(frozen=True)
class Bench:
    """DreamBench: subject -> class noun (file order) and the two prompt template lists."""

    root: str
    classes: dict[str, str]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    def is_live(self, subject: str) -> bool:
        return self.classes[subject] in LIVE_CLASSES

    def prompts(self, subject: str) -> list[str]:
        """The subject's prompts with its class noun and no unique token."""
        templates = self.live_prompts if self.is_live(subject) else self.object_prompts
        return [fill(t, "", self.classes[subject]) for t in templates]

    def photos(self, subject: str) -> list[str]:
        """Paths of all the subject's photos, in name order."""
        folder = os.path.join(self.root, subject)
        names = os.listdir(folder) if os.path.isdir(folder) else []
        photos = sorted(n for n in names if n.lower().endswith(PHOTO_SUFFIXES))
        if not photos:
            raise UserError(f"no photos of subject {subject!r} in {folder}")
        return [os.path.join(folder, n) for n in photos]

    def reference(self, subject: str) -> str:
        return self.photos(subject)[0]


def read_bench(root: str) -> Bench:
    """Parse `root/prompts_and_classes.txt` (DreamBench's format, see the module doc)."""
    if not os.path.isdir(root):
        raise UserError(f"DreamBench folder not found: {root}")
    path = os.path.join(root, PROMPTS_FILE)
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    classes, prompts, current = {}, {"object": [], "live": []}, None
    for line in lines:
        if line in _PROMPT_LISTS:
            current = _PROMPT_LISTS[line]
        elif (m := _CLASS_LINE.match(line)) and line != "subject_name,class":
            classes[m[1]] = m[2]
        elif (m := _PROMPT_LINE.match(line)) and current:
            prompts[current].append(m[1])
    if not classes or not all(prompts.values()):
        raise UserError(f"{path}: expected a subject,class table and the object and live prompts")
    return Bench(root, classes, tuple(prompts["object"]), tuple(prompts["live"]))


@dataclass(frozen=True)
class Task:
    """One prompt of one subject (mode "single") or pair ("pairs"): the unit of resuming."""

    mode: str
    subjects: tuple[str, ...]
    prompt_index: int
    prompt: str

    @property
    def name(self) -> str:
        return "+".join(self.subjects)

    @property
    def key(self) -> tuple:
        return (self.mode, self.name, self.prompt_index)


def select_subjects(bench: Bench, names: str | None) -> list[str]:
    """Subjects named in a comma-separated list (all, in file order, when None)."""
    if names is None:
        return list(bench.classes)
    chosen = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    for name in chosen:
        if name not in bench.classes:
            raise UserError(
                f"unknown DreamBench subject {name!r}; known: {', '.join(bench.classes)}"
            )
    return chosen


def make_tasks(bench: Bench, subjects: list[str], count: int | None, pairs: bool) -> list[Task]:
    """Single-subject tasks (first `count` prompts each), then the pairs of `subjects`."""
    tasks = [
        Task("single", (s,), i, prompt)
        for s in subjects
        for i, prompt in enumerate(bench.prompts(s)[:count])
    ]
    if pairs:
        chosen = [p for p in PAIRS if set(p) <= set(subjects)]
        if not chosen:
            raise UserError(f"no DreamBench pair has both subjects among {', '.join(subjects)}")
        tasks += [
            Task("pairs", pair, i, fill(t, *(bench.classes[s] for s in pair)))
            for pair in chosen
            for i, t in enumerate(PAIR_TEMPLATES[:count])
        ]
    return tasks


def task_seed(seed: int, task: Task) -> int:
    """The sampler seed of a task's images: 31 bits of SHA-256 of (seed, mode, name, index)."""
    text = f"{seed}/{task.mode}/{task.name}/{task.prompt_index}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") >> 1
