"""Which LLM layer an output projector can compose held-out pairs from:
python bench/toyworld_projector_layers.py RUN_DIR [image|audio|video] [steps]

RUN_DIR is a ``toyworld train`` output with its stages run (it reads ``stages/stage2/final``, the
pipeline after stage 2, and ``data/stage2-captions.jsonl``). The LLM is run once, teacher-forced on
"caption -> caption <signal>" as stage 2 renders it, for stage 2's captions of the modality (image by
default) and for 100 seen and 100 held-out captions (``world.sample_specs``, seeds 0 and 1, as the
image-generator phase's ``eval_specs``); the signal tokens' states are kept at every layer
(transformers' ``hidden_states``). For each layer, and with
one and two decoder layers, a fresh output projector (the recipe's: transformer, width 128) is
trained on the stage-2 captions alone (AdamW 1e-3, cosine, batch 16, ``steps``, NExT-GPT's per-token
L2) and scored by the median relative squared error ``|c - t|^2 / |t|^2`` against the generator's own
text conditioning of each caption, as bench/toyworld_projector_gap.py does through the pipeline.
"""
import json
import math
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
from anymodal import AnyModalPipeline  # noqa: E402
from anymodal.config import OutputProjectorConfig  # noqa: E402
from anymodal.modality import Modality  # noqa: E402
from anymodal.processor import Message  # noqa: E402
from anymodal.projectors import build_output_projector  # noqa: E402
from anymodal.toyworld import world  # noqa: E402

if len(sys.argv) < 2:
    raise SystemExit(__doc__)
torch.set_num_threads(1)
run = sys.argv[1].rstrip("/")
M = Modality.parse(sys.argv[2]) if len(sys.argv) > 2 else Modality.IMAGE
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
pipe = AnyModalPipeline.from_pretrained(f"{run}/stages/stage2/final")
model, proc = pipe.model, pipe.processor
gen = pipe.generators[M]
signal = "".join(proc.signal_strings[M])
eos = proc.tokenizer.eos_token or ""


@torch.no_grad()
def states(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(captions, layers + 1, signal tokens, hidden) states and (captions, seq, dim) targets."""
    xs, ts = [], []
    for i in range(0, len(captions), 32):
        part = captions[i:i + 32]
        rows = [proc.tokenizer(proc.format([Message("user", c), Message("assistant", f"{c} {signal}{eos}")],
                                           add_generation_prompt=False), add_special_tokens=False)["input_ids"]
                for c in part]
        width = max(map(len, rows))
        ids = torch.tensor([r + [proc.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
        hidden = model.language_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        block = model.signal_ids[M]
        starts = (ids == block[0]).nonzero()
        cols = starts[:, 1:2] + torch.arange(len(block))
        xs.append(torch.stack([h[starts[:, 0:1], cols] for h in hidden], 1))
        ts.append(gen.encode_text(part)["prompt_embeds"].float())
    return torch.cat(xs), torch.cat(ts)


train_caps = sorted({r["caption"] for r in map(json.loads, open(f"{run}/data/stage2-captions.jsonl"))
                     if r["modality"] == M.value})
data = {"train": states(train_caps)} | {
    name: states([s.caption() for s in world.sample_specs(M, 100, seed, split)])
    for seed, (name, split) in enumerate((("seen", "train"), ("heldout", "heldout")))}


def error(c: torch.Tensor, t: torch.Tensor) -> float:
    return (((c - t) ** 2).sum((1, 2)) / (t ** 2).sum((1, 2))).median().item()


def trial(layer: int, decoder_layers: int) -> dict[str, float]:
    torch.manual_seed(0)
    x, t = data["train"][0][:, layer], data["train"][1]
    cfg = OutputProjectorConfig(type="transformer", targets={"prompt_embeds": list(t.shape[1:])}, hidden_dim=128,
                                num_layers=decoder_layers, num_heads=4)
    proj = build_output_projector(cfg, x.shape[-1])
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(x), (16,), generator=g)
        loss = torch.linalg.vector_norm(proj(x[idx])["prompt_embeds"] - t[idx], dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    proj.eval()
    with torch.no_grad():
        return {k: error(proj(v[0][:, layer])["prompt_embeds"], v[1]) for k, v in data.items()}


n_layers = data["train"][0].shape[1] - 1
print(f"{run}: {len(train_caps)} stage-2 {M.value} captions, {n_layers} LLM layers, {steps} steps; "
      f"median relative squared error", flush=True)
for layer in range(1, n_layers + 1):
    for decoder_layers in (1, 2):
        r = trial(layer, decoder_layers)
        name = f"hidden_states[{layer}]{' (last)' if layer == n_layers else ''}, {decoder_layers} decoder layer(s)"
        print(f"{name:44s} train {r['train']:.4f}  seen {r['seen']:.4f}  held out {r['heldout']:.4f}", flush=True)
