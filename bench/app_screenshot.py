"""`sdjax app` on the embedded model, driven in headless Chromium as a user would: the
README's screenshot (docs/app.png) and what a user waits.

Starts the page as `sdjax app` does (one CPU device per core, the sampler compiled before
the server listens), uploads two held-out toy subjects as RGBA cut-outs, types their labels,
drags their boxes on the frame, asks for the overlay and generates twice (seeds 0 and 1).
Prints the compile time before serving and the seconds from the click to the results of
each request: the first request should cost what the second does.

  python bench/app_screenshot.py [--out docs/app.png] [--steps 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

SUBJECTS = (
    ("star", ("star", "red", "solid", "large")),
    ("ring", ("ring", "blue", "striped", "large")),
)
DRAGS = (((24, 40), (150, 176)), ((170, 150), (300, 292)))
PROMPT = "a star and a ring on a beige background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/app.png")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--port", type=int, default=7871)
    args = parser.parse_args()

    from sdjax.parallel.cpu import use_cpu_cores

    use_cpu_cores()
    from playwright.sync_api import sync_playwright

    from sdjax.app import load_model, serve
    from sdjax.data.toy import ToyWorld
    from sdjax.eval.toy_cases import render

    work = tempfile.mkdtemp(prefix="sdjax-app-bench-")
    pictures = []
    for label, attrs in SUBJECTS:
        image, mask = render(ToyWorld(), *attrs)
        path = os.path.join(work, f"{label}.png")
        Image.fromarray(np.dstack([image, mask.astype(np.uint8) * 255])).save(path)
        pictures.append(path)

    model = load_model(None)
    compile_s = model.warm_up(args.steps)
    page_app, url = serve(model, "127.0.0.1", args.port, 10, work, block=False)
    waits = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"))
        page = browser.new_page(viewport={"width": 1400, "height": 1250})
        page.goto(url)
        page.wait_for_selector("#frame .sdjax-frame")
        for k, ((label, _), path) in enumerate(zip(SUBJECTS, pictures), start=1):
            page.set_input_files(f"#photo{k} input[type=file]", path)
            page.fill(f"#label{k} textarea", label)
        frame = page.locator("#frame .sdjax-frame").bounding_box()
        for (x0, y0), (x1, y1) in DRAGS:
            page.mouse.move(frame["x"] + x0, frame["y"] + y0)
            page.mouse.down()
            page.mouse.move(frame["x"] + x1, frame["y"] + y1, steps=5)
            page.mouse.up()
        page.wait_for_function("document.querySelector('#box2 textarea').value !== ''")
        page.fill("#prompt textarea", PROMPT)
        page.fill("#steps input", str(args.steps))
        page.fill("#count input", "2")
        page.check("#overlay input")
        for seed in (1, 0):
            page.fill("#seed input", str(seed))
            page.wait_for_timeout(300)
            before = page.eval_on_selector_all("#download a", "links => links.map(a => a.href)")
            start = time.perf_counter()
            page.click("#generate")
            page.wait_for_function(
                "before => { const a = document.querySelector('#download a');"
                " return a !== null && !before.includes(a.href); }",
                arg=before,
                timeout=600_000,
            )
            waits.append(time.perf_counter() - start)
        page.wait_for_timeout(500)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    page_app.close()
    print(f"model: embedded default, {args.steps} DDIM steps, 2 images per request")
    print(f"compiled before serving: {compile_s:.1f} s")
    for n, wait in enumerate(waits, start=1):
        print(f"request {n}: {wait:.1f} s from the click to the results")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
