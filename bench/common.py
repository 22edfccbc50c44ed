"""Shared helpers of the benchmark scripts: worker processes, timing, memory, random weights,
machine facts and the Markdown/JSON report.

Every framework under test runs in its own worker process (the benchmark script started
again with `--worker NAME`), so peak RSS and thread pools never mix. The parent sends one
request per line (`{"op": NAME, ...}` as JSON) on the worker's stdin and reads one JSON
reply line; the worker answers on its original stdout, and anything else it prints goes to
stderr. Timed runs alternate between workers (`interleave`), so drifting machine load
(other jobs, thermal state) falls on both sides alike.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import traceback

import numpy as np

BUSY_LOAD = 0.25  # load average per CPU above which timings are flagged as unreliable
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "numpy")


# --- worker processes -----------------------------------------------------------------


class Worker:
    """One worker process of `script` (`python script --worker NAME`)."""

    def __init__(self, script: str, name: str):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, script, "--worker", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, op: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited with status {self.proc.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.name} failed in {op}:\n{reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(handler) -> None:
    """Worker side: answer requests with `handler.<op>(**kwargs) -> dict` until stdin ends."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints (progress, compile logs) must not corrupt the replies
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = getattr(handler, op)(**request)
        except Exception:
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def interleave(workers: dict[str, Worker], repeats: int, **request) -> dict[str, list[dict]]:
    """`repeats` rounds of one `run` request per worker, alternating which worker goes first;
    each request carries its round number as `repeat`."""
    replies = {name: [] for name in workers}
    names = list(workers)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            replies[name].append(workers[name].call("run", repeat=r, **request))
    return replies


# --- measurements ---------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def median(values) -> float:
    return float(statistics.median(values))


class CompileClock:
    """Seconds JAX spends tracing, lowering to MLIR and compiling with XLA (and the number
    of XLA compilations) from its creation on, read from `jax.monitoring` events."""

    EVENTS = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
        "/jax/core/compile/backend_compile_duration": "compile",
    }

    def __init__(self):
        import jax

        self.seconds = dict.fromkeys(self.EVENTS.values(), 0.0)
        self.compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_) -> None:
        kind = self.EVENTS.get(event)
        if kind is not None:
            self.seconds[kind] += duration
            self.compiles += kind == "compile"

    def snapshot(self) -> dict:
        return {**self.seconds, "total": sum(self.seconds.values()), "compiles": self.compiles}


def cold_compiles() -> None:
    """Turn JAX's persistent compilation cache off: compile times are then always cold."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)


# --- random weights -------------------------------------------------------------------


def random_params(abstract, seed: int = 0):
    """numpy float32 weights in the shapes of an abstract (possibly boxed) parameter tree:
    kernels ~ N(0, 1/fan_in), biases 0, norm scales 1, anything else ~ N(0, 0.02). Scaled
    so activations stay O(1) through a deep random network (no overflow, no denormals),
    without compiling the model's initialiser."""
    import jax

    from sdjax.models.layers import unbox

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, tuple(leaf.shape)
        if name == "bias":
            return np.zeros(shape, np.float32)
        if name == "scale":
            return np.ones(shape, np.float32)
        std = 1.0 / np.sqrt(np.prod(shape[:-1])) if name == "kernel" else 0.02
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    return jax.tree_util.tree_map_with_path(fill, unbox(abstract))


# --- sampling inputs ------------------------------------------------------------------

TEXT_SCALE, IMAGE_SCALE = 7.5, 1.5  # the guidance scales of every benchmark
# Two sampling requests (prompt, [(label, RGB colour, box or None)], seed). The second
# differs in prompt, subject count, boxes and seed, but in no array shape: it must not
# compile anything.
CASES = [
    ("a red striped circle on a white background", [("circle", (220, 40, 40), None)], 0),
    (
        "a blue dotted square and a green circle on a beige background",
        [("square", (40, 75, 220), (0.05, 0.3, 0.45, 0.7)), ("circle", (40, 180, 60), None)],
        1,
    ),
]


def draw_subject(folder: str, shape: str, colour, index: int) -> tuple[str, str]:
    """A 64 px reference of one shape (a circle or a square) on white, and its mask, as
    PNG files."""
    from PIL import Image

    yy, xx = np.mgrid[:64, :64] - 31.5
    mask = np.hypot(xx, yy) < 22 if shape == "circle" else np.maximum(abs(xx), abs(yy)) < 18
    image = np.where(mask[..., None], np.uint8(colour), np.uint8(255))
    paths = (os.path.join(folder, f"ref{index}.png"), os.path.join(folder, f"mask{index}.png"))
    Image.fromarray(image.astype(np.uint8)).save(paths[0])
    Image.fromarray((mask * 255).astype(np.uint8)).save(paths[1])
    return paths


def write_cases(folder: str) -> list[dict]:
    """`CASES` as JSON-able dicts, their reference images and masks written to `folder`."""
    os.makedirs(folder, exist_ok=True)
    cases, count = [], 0
    for prompt, subjects, seed in CASES:
        specs = []
        for label, colour, box in subjects:
            image, mask = draw_subject(folder, label, colour, count)
            specs.append({"image": image, "mask": mask, "label": label, "box": box})
            count += 1
        cases.append({"prompt": prompt, "subjects": specs, "seed": seed})
    return cases


def subjects_of(case: dict) -> list:
    from sdjax.sampling import Subject

    return [Subject(s["image"], s["label"], s["mask"], s["box"]) for s in case["subjects"]]


def sample_case(pipeline, case: dict, steps: int, batch: int) -> np.ndarray:
    """`sdjax.sample` of one case in one batch -> uint8 images `[B, R, R, 3]`."""
    from sdjax.sampling import sample

    images = sample(
        pipeline,
        case["prompt"],
        subjects_of(case),
        seed=case["seed"],
        num_steps=steps,
        text_scale=TEXT_SCALE,
        image_scale=IMAGE_SCALE,
        num_images=batch,
        batch_size=batch,
    )
    return np.stack([np.asarray(image) for image in images])


# --- training inputs ------------------------------------------------------------------


def synthetic_batch(model, batch: int, seed: int = 0) -> dict:
    """A batch in the loader's contract (`sdjax.train.tasks.subject_diffusion.batch_spec`),
    plus `loc`, the location mask `[B, h, h, 1]` that the PyTorch side takes precomputed."""
    from sdjax.conditioning import location_mask
    from sdjax.train.tasks.subject_diffusion import batch_spec

    spec = batch_spec(model, batch)
    rng = np.random.default_rng(seed)
    n, m = model.max_subjects, spec["masks"].shape[-1]
    corner = rng.uniform(0.0, 0.5, (batch, n, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0.25, 0.5, (batch, n, 2))], axis=-1)
    valid = np.arange(n)[None] < rng.integers(1, n + 1, (batch, 1))
    centres = (np.arange(m) + 0.5) / m
    inside_x = (centres >= boxes[..., 0:1]) & (centres < boxes[..., 2:3])
    inside_y = (centres >= boxes[..., 1:2]) & (centres < boxes[..., 3:4])
    values = {
        "image": rng.uniform(-1.0, 1.0, spec["image"].shape),
        "refs": rng.standard_normal(spec["refs"].shape),
        "boxes": boxes,
        "valid": valid,
        "use_box": valid,
        "ids": rng.integers(0, model.text.vocab_size, spec["ids"].shape),
        "placeholders": np.broadcast_to(1 + np.arange(n), (batch, n)),
        "label_positions": np.broadcast_to(1 + n + np.arange(n), (batch, n)),
        "masks": inside_y[..., :, None] & inside_x[..., None, :],
        "regions": inside_y[..., :, None] & inside_x[..., None, :],
        "drop_text": np.zeros(batch, bool),
        "drop_loc": np.zeros(batch, bool),
        "drop_objs": np.zeros(batch, bool),
        "noise_seed": np.arange(batch),
    }
    arrays = {k: np.asarray(values[k], spec[k].dtype).reshape(spec[k].shape) for k in spec}
    loc = location_mask(arrays["boxes"], arrays["valid"], model.latent_size)
    return {**arrays, "loc": np.asarray(loc)}


# --- report ---------------------------------------------------------------------------


def train_run(config):
    """The trainer's own step (`sdjax.train.run.plan_step`) for `config`'s model and
    training settings: (plan, mesh, rules, batch spec, loss config). Use the plan inside
    `jax.set_mesh(mesh)` and the rules; `plan.initial_state(init_flat, seed)` makes a state
    from chosen weights."""
    import flax.linen as nn
    import jax

    from sdjax.parallel.mesh import make_mesh
    from sdjax.parallel.sharding import as_rules
    from sdjax.train.run import plan_step
    from sdjax.train.step import LossConfig
    from sdjax.train.tasks.subject_diffusion import SubjectDiffusionTask

    mesh, rules = make_mesh(config.mesh.to_dict()), as_rules(config.sharding_rules)
    task = SubjectDiffusionTask(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        plan = plan_step(config, task, mesh, rules)
    spec = task.batch_spec(config.train.batch_size)
    return plan, mesh, rules, spec, LossConfig(**config.get("loss", {}))


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def machine_facts() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        **versions(),
    }


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(tables: list[tuple[str, list[str], list[list]]], payload: dict) -> None:
    """Print Markdown tables (title, headers, rows), the machine's facts
    (`payload["machine"]`, best taken before the benchmark starts, when the load average is
    the other jobs' alone) and one `JSON {...}` line with the whole payload."""
    facts = payload.setdefault("machine", machine_facts())
    for title, headers, rows in tables:
        print(f"\n### {title}\n")
        print(markdown_table(headers, rows))
    print("\nmachine: " + ", ".join(f"{k} {v}" for k, v in facts.items() if v not in ("", None)))
    if facts["load_avg_1min"] > BUSY_LOAD * facts["cpus"]:
        print(
            f"WARNING: the machine was busy when this started (load average "
            f"{facts['load_avg_1min']} on {facts['cpus']} CPUs): these timings are not "
            "representative; PyTorch's OpenMP threads suffer most from shared cores."
        )
    print("JSON " + json.dumps(payload, default=float), flush=True)


def fmt(value, digits: int = 3) -> str:
    """A number to `digits` significant digits; None (not measured) as n/a."""
    return "n/a" if value is None else f"{value:.{digits}g}"
