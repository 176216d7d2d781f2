"""How far the image output projector's conditioning is from the generator's own text conditioning
of the same caption, seen vs held out: python bench/toyworld_projector_gap.py PIPELINE_DIR [n]

For ``n`` seen and ``n`` held-out image prompts (the image-generator phase's ``eval_specs``, seed 0) it
runs the pipeline with rendering replaced by a recorder, and compares the image output projector's
conditioning with the generator's own text conditioning of the same caption (relative squared error,
``|c - t|^2 / |t|^2``). It also counts the replies that copy the request exactly, so that a gap can
be put on the projector rather than the LLM.
"""
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
from anymodal import AnyModalPipeline  # noqa: E402
from anymodal.modality import Modality  # noqa: E402
from anymodal.toyworld.image_generator import eval_specs  # noqa: E402

if len(sys.argv) < 2:
    raise SystemExit(__doc__)
torch.set_num_threads(1)
pipe = AnyModalPipeline.from_pretrained(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
gen = pipe.generators[Modality.IMAGE]
captured: list[dict] = []


def record(conditioning: dict, *args, **kwargs) -> list[None]:  # stands in for gen.render: nothing is drawn
    captured.append(conditioning)
    return [None] * next(iter(conditioning.values())).shape[0]


gen.render = record
for split, specs in eval_specs(n, 0).items():
    errors, copied = [], 0
    for spec in specs:
        captured.clear()
        out = pipe(spec.caption(), seed=0)
        if not captured:  # no image signal in the reply
            continue
        copied += out.text[0].split("<")[0].strip().lower() == spec.caption().lower()
        target = gen.encode_text([spec.caption()])
        key = next(k for k in captured[0] if torch.is_tensor(captured[0][k]) and k in target)
        c, t = captured[0][key].float(), target[key].float()
        errors.append(((c - t) ** 2).sum().item() / (t ** 2).sum().item())
    e = torch.tensor(errors)
    print(f"{sys.argv[1]} {split}: image signal in {len(e)}/{len(specs)}, reply == request {copied}, "
          f"relative squared error median {e.median():.3f} mean {e.mean():.3f}")
