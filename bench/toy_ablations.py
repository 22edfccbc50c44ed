"""The paper's ablations (docs/method.md §7) on the toy world: each row is configs/toy.py
with one part of the method switched off, trained with the same budget and measured with
`sdjax eval toy`. The last row switches off sdjax's own addition, region-bound attention
(beyond the paper).

    python bench/toy_ablations.py --data workdirs/toy_data --image-encoder workdirs/toy_clip \\
        --root workdirs/ablations [--steps 3000] [--rows full,no_adapter] [--cases 100]

Every row trains in ROOT/ROW (rerunning resumes: a finished row is not retrained, a
finished evaluation is not rerun), then the script prints a Markdown table of the toy
metrics beside the sign of the paper's DINO change for the same ablation, and a second
one of colour, toy-CLIP and IoU split by one and two subjects (as the paper reports),
and writes them to ROOT/ablations.md and ROOT/ablations.json. Each row at the default
budget takes about as long as the embedded model's training (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# row -> (config overrides, the paper's DINO change single / two subjects; docs/method.md §7)
ROWS = {
    "full": ([], None),
    "no_location_control": (["model.location_control=False"], (-0.017, -0.029)),
    "no_box_coordinates": (["model.box_coordinates=False"], (+0.021, -0.042)),
    "no_adapter": (["model.unet.adapter=False"], (-0.177, -0.095)),
    "no_attention_loss": (["loss.attn_weight=0.0"], (-0.019, -0.006)),
    "no_cls_feature": (["model.cls_feature=False"], (-0.074, -0.049)),
    "no_region_attention": (["model.region_attention=False"], None),  # not in the paper
}
# metric -> whether higher is better
METRICS = {
    "present": True,
    "colour": True,
    "pattern": True,
    "shape": True,
    "clip_i": True,
    "iou": True,
    "background": True,
    "swap": False,
    "leak": False,
    "identity": True,
    "obedience": True,
}


def sdjax(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sdjax", *args], check=True, cwd=ROOT)


def train_and_evaluate(row: str, args) -> dict:
    workdir = os.path.join(args.root, row)
    result = os.path.join(workdir, "eval.json")
    if not os.path.isfile(result):
        overrides, _ = ROWS[row]
        sets = [
            f"data.path={args.data}",
            f"init.image_encoder={args.image_encoder}",
            f"train.num_steps={args.steps}",
            *overrides,
        ]
        sdjax(
            "train",
            "--config",
            os.path.join(ROOT, "configs", "toy.py"),
            "--workdir",
            workdir,
            *[item for s in sets for item in ("--set", s)],
        )
        weights = [] if args.ema else ["--raw-weights"]
        sdjax(
            "eval",
            "toy",
            "--checkpoint",
            workdir,
            *weights,
            "--cases",
            str(args.cases),
            "--text-scale",
            str(args.text_scale),
            "--image-scale",
            str(args.image_scale),
            "--out",
            result,
        )
    with open(result) as f:
        return json.load(f)


def table(results: dict) -> str:
    head = "| row | " + " | ".join(METRICS) + " | paper DINO change (1 / 2 subjects) |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    full = results.get("full")
    for row, metrics in results.items():
        cells = []
        for name, higher in METRICS.items():
            if metrics.get(name) is None:  # an evaluation from before the metric existed
                cells.append("-")
                continue
            cell = f"{metrics[name]:.3f}"
            if full is not None and row != "full" and full.get(name) is not None:
                better = (metrics[name] - full[name]) * (1 if higher else -1)
                cell += " (+)" if better > 0 else " (-)" if better < 0 else ""
            cells.append(cell)
        paper = ROWS[row][1]
        cells.append("-" if paper is None else f"{paper[0]:+.3f} / {paper[1]:+.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(+)/(-): better/worse than the full method on that metric.\n"


# the paper reports one- and two-subject results apart; `sdjax eval toy` cases of each kind
SUBJECT_KINDS = {
    1: ("one subject, auto", "one subject, box"),
    2: ("two subjects, auto", "two subjects, box"),
}
SPLIT_METRICS = ("colour", "clip_i", "iou")


def subject_split(by_kind: dict) -> dict:
    """metric -> [one-subject, two-subject] model score: the mean over the auto-box and
    given-box cases of that subject count (an eval.json's `by_kind`)."""
    return {
        m: [
            sum(by_kind[k]["model"][m] for k in kinds) / len(kinds)
            for kinds in SUBJECT_KINDS.values()
        ]
        for m in SPLIT_METRICS
    }


def split_table(splits: dict) -> str:
    """row -> `subject_split` as a Markdown table."""
    head = "| row | " + " | ".join(f"{m} (1 / 2 subjects)" for m in SPLIT_METRICS) + " |"
    lines = [head, "|" + "---|" * (len(SPLIT_METRICS) + 1)]
    for row, split in splits.items():
        cells = [f"{one:.3f} / {two:.3f}" for one, two in (split[m] for m in SPLIT_METRICS)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="toy records (sdjax data toy)")
    p.add_argument("--image-encoder", required=True, help="the toy CLIP run (configs/toy_clip.py)")
    p.add_argument("--root", required=True, help="folder of the rows' workdirs")
    p.add_argument("--steps", type=int, default=3000, help="training steps per row")
    p.add_argument("--cases", type=int, default=100, help="toy eval cases per row")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of rows")
    p.add_argument("--ema", action="store_true", help="evaluate EMA weights (default: raw)")
    p.add_argument("--text-scale", type=float, default=3.0, help="guidance (the shipped model's)")
    p.add_argument("--image-scale", type=float, default=3.0, help="guidance (the shipped model's)")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    os.makedirs(args.root, exist_ok=True)
    evaluations = {row: train_and_evaluate(row, args) for row in rows}
    results = {row: e["metrics"]["model"] for row, e in evaluations.items()}
    splits = {row: subject_split(e["by_kind"]) for row, e in evaluations.items()}
    text = table(results) + "\n" + split_table(splits)
    print(text)
    with open(os.path.join(args.root, "ablations.md"), "w") as f:
        f.write(
            f"steps per row: {args.steps}, eval cases: {args.cases}, guidance: "
            f"{args.text_scale} / {args.image_scale}\n\n{text}"
        )
    with open(os.path.join(args.root, "ablations.json"), "w") as f:
        json.dump(
            {"steps": args.steps, "cases": args.cases, "rows": results, "by_subjects": splits},
            f,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
