"""How much of each image shape a toy-world image VAE keeps, by size: a ceiling for the UNet.

Renders ``n`` seen and ``n`` held-out world images (the image-generator phase's ``eval_specs``),
encodes them with the VAE (the posterior's mean, as the phase's ``vae_reconstruction`` does), decodes,
and scores the reconstructions with the phase's ``score_images`` (``shape_ok`` and ``shape_ok_<size>``),
beside the same scores of the rendered originals (the checker's own ceiling); then the commonest
misreadings of small shapes.

    python bench/toyworld_vae_sizes.py anymodal/assets/default/generators/image/vae [N]
    python bench/toyworld_vae_sizes.py runs/exp-vae4k/image-vae 400
"""

import collections
import json
import sys

import numpy as np
import torch

from anymodal.toyworld import checkers, world
from anymodal.toyworld.diffusion import images_to_tensor, tensor_to_images
from anymodal.toyworld.image_generator import eval_specs, score_images

if len(sys.argv) < 2:
    raise SystemExit(__doc__)
torch.set_num_threads(1)
from diffusers import AutoencoderKL  # noqa: E402

vae = AutoencoderKL.from_pretrained(sys.argv[1]).float().eval()
n = int(sys.argv[2]) if len(sys.argv) > 2 else 240
keys = ("shape_ok", *(f"shape_ok_{s}" for s in world.SIZES))
report: dict[str, dict[str, float]] = {}
missed: collections.Counter = collections.Counter()
for split, specs in eval_specs(n, 0).items():
    originals = np.stack([world.render(s, np.random.default_rng(k)) for k, s in enumerate(specs)])
    with torch.no_grad():
        x = images_to_tensor(originals)
        y = torch.cat([vae.decode(vae.encode(b).latent_dist.mean).sample for b in x.split(64)])
    decoded = list(tensor_to_images(y))
    for name, images in (("reconstructed", decoded), ("original", list(originals))):
        scores = score_images(images, specs)
        report[f"{split} {name}"] = {k: scores[k] for k in keys if k in scores}
    for image, s in zip(decoded, specs):
        shape = checkers.read_image(image).shape
        if s.size == "small" and shape != s.shape:
            missed[f"{split}: {s.colour} {s.shape} on {s.background} -> {shape}"] += 1
print(json.dumps({"vae": sys.argv[1], "n_per_split": n, "shape_read_right": report}, indent=1))
for k, v in missed.most_common(8):
    print(f"  {v:3d}  {k}")
