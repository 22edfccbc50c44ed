"""Writes the reference images README's Python example uses (run from anywhere):

    python examples/make_references.py

- star.png: a purple checkered star as an RGBA cut-out (its alpha is its mask; the colour
  under the transparent pixels is a distractor the sampler must not see);
- ring.png + ring_mask.png: a green dotted ring on a grey backdrop, and its mask.
Both subjects are attribute combinations the embedded model never saw in training (the toy
world's held-out ones), so their colour and pattern can only come from these files.
"""

import os

import numpy as np
from PIL import Image

from sdjax.data.toy import ToyWorld, render_subject

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    world = ToyWorld()
    star, star_mask = render_subject(world, "star", "purple", "checkered")
    under = np.where(star_mask[..., None], star, np.uint8([40, 165, 55]))  # green, hidden
    alpha = np.where(star_mask, 255, 0).astype(np.uint8)
    Image.fromarray(np.dstack([under, alpha]), "RGBA").save(os.path.join(HERE, "star.png"))
    ring, ring_mask = render_subject(world, "ring", "green", "dotted", background="gray")
    Image.fromarray(ring).save(os.path.join(HERE, "ring.png"))
    Image.fromarray(ring_mask.astype(np.uint8) * 255).save(os.path.join(HERE, "ring_mask.png"))
    print(f"wrote star.png, ring.png and ring_mask.png in {HERE}")


if __name__ == "__main__":
    main()
