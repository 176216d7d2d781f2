"""What a toy-world image generator draws when it is wrong: shape by size, and position.

Generates ``n`` seen and ``n`` held-out prompts (the image-generator phase's ``eval_specs``, seed 0)
through anymodal's ``stable-diffusion`` adapter (20 DPM-Solver++ steps, guidance 3, the phase's own
evaluation settings), scores them with the phase's ``score_images``, and counts (asked, read)
positions and shapes.

    python bench/toyworld_image_confusion.py runs/full2/image-generator 80
"""

import collections
import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
from anymodal.config import GeneratorConfig  # noqa: E402
from anymodal.registry import GENERATORS  # noqa: E402
from anymodal.toyworld import checkers  # noqa: E402
from anymodal.toyworld.image_generator import eval_specs, score_images  # noqa: E402

if len(sys.argv) < 2:
    raise SystemExit(__doc__)
torch.set_num_threads(1)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 80
gen = GENERATORS.get("stable-diffusion").from_config(GeneratorConfig(
    type="stable-diffusion", pretrained=sys.argv[1], settings={"num_inference_steps": 20, "guidance_scale": 3.0}))
report = {}
for split, specs in eval_specs(n, 0).items():
    images = gen.render(gen.encode_text([s.caption() for s in specs]), rng=torch.Generator().manual_seed(0))
    read = [checkers.read_image(im) for im in images]
    scores = score_images(images, specs)
    report[split] = {
        "scores": scores,
        "position (asked -> read)": dict(sorted(collections.Counter(
            f"{s.position} -> {r.position}" for s, r in zip(specs, read)).items())),
        "shape (asked -> read)": dict(sorted(collections.Counter(
            f"{s.shape} -> {r.shape}" for s, r in zip(specs, read)).items())),
    }
print(json.dumps({"generator": sys.argv[1], "n_per_split": n, **report}, indent=1))
