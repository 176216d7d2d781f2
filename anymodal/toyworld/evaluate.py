"""``anymodal eval``: score a model on toy-world prompts with analytic checkers no model wrote.

Each direction draws dialogues of one task from the world (held-out combinations by default),
runs the model on the user turn, and scores the reply:

    t2i  the generated image's dominant foreground colour and shape (pixel statistics)
    t2a  the generated audio's fundamental frequency (FFT) and duration
    t2v  the generated video's direction of motion
    i2t, a2t, v2t  the text answer to a question about the given medium

A reply with no medium of the asked kind counts as wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..commands import add_model_args, load_pipeline
from ..modality import Modality
from . import checkers, world

DIRECTIONS = ("t2i", "t2a", "t2v", "i2t", "a2t", "v2t")
# The fields each generation direction is judged on (those its prompt leaves unsaid are skipped).
HEADLINE_FIELDS = {"t2i": ("colour", "shape"), "t2a": ("note", "duration"), "t2v": ("direction",)}
_MEDIA = {"t2i": Modality.IMAGE, "t2a": Modality.AUDIO, "t2v": Modality.VIDEO,
          "i2t": Modality.IMAGE, "a2t": Modality.AUDIO, "v2t": Modality.VIDEO}


@dataclass
class DirectionResult:
    direction: str
    n: int = 0
    correct: int = 0
    field_correct: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    field_n: dict[str, int] = field(default_factory=dict)

    def field_accuracy(self) -> dict[str, float]:
        return {k: v / self.field_n[k] for k, v in self.field_correct.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                "field_accuracy": self.field_accuracy(), "examples": self.examples}


def _user_inputs(dialogue: world.Dialogue) -> tuple[str, dict[Modality, list]]:
    turn = dialogue.turns[0]
    text = " ".join(p["text"] for p in turn["content"] if p["type"] == "text")
    media: dict[Modality, list] = {}
    for p in turn["content"]:
        if p["type"] == "image":
            media.setdefault(Modality.IMAGE, []).append(p["image"])
        elif p["type"] == "audio":
            media.setdefault(Modality.AUDIO, []).append((p["audio"], p["sample_rate"]))
        elif p["type"] == "video":
            media.setdefault(Modality.VIDEO, []).append(p["video"])
    return text, media


def _score(direction: str, dialogue: world.Dialogue, prompt: str, out, row: int) -> tuple[bool, dict[str, bool]]:
    target = dialogue.target
    if direction in HEADLINE_FIELDS:
        # judge only what the prompt asked for ("play a low square tone" names no note)
        asked = world.parse_caption(prompt) or target
        names = [f for f in HEADLINE_FIELDS[direction] if getattr(asked, f) is not None]
        made = out.media[_MEDIA[direction]][row]
        if not made:
            return False, {f: False for f in names}
        item = made[0]
        try:
            if direction == "t2i":
                s = checkers.score_image(item, target)
            elif direction == "t2a":
                s = checkers.score_audio(item.array, item.sample_rate, target)
            else:
                s = checkers.score_video(item, target)
        except ValueError:  # a medium the checkers cannot read (audio under 0.1 s, say) shows nothing asked
            return False, {f: False for f in names}
        fields = {f: bool(s.get(f"{f}_ok", False)) for f in names}
        return all(fields.values()), fields
    ok = checkers.check_answer(dialogue.question, out.text[row], target)
    return ok, {dialogue.question: ok}


def evaluate(pipe, n: int = 20, split: str = "heldout", directions: Sequence[str] = DIRECTIONS, seed: int = 0,
             batch_size: int = 8, progress: bool = True) -> dict[str, DirectionResult]:
    """Score ``pipe`` on ``n`` toy-world prompts per direction. Directions whose modality the
    model cannot take or make are scored 0 (every reply lacks what was asked)."""
    from tqdm.auto import tqdm

    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}; expected some of: {', '.join(DIRECTIONS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    results: dict[str, DirectionResult] = {}
    rng = np.random.default_rng(seed)
    bar = tqdm(total=n * len(directions), desc="eval", unit="prompt", disable=not progress)
    for d in directions:
        res = results[d] = DirectionResult(d)
        dialogues = [world.sample_dialogue(rng, split=split, tasks=[d]) for _ in range(n)]
        for start in range(0, n, batch_size):
            chunk = dialogues[start:start + batch_size]
            prompts, media = zip(*[_user_inputs(x) for x in chunk])
            m = _MEDIA[d]
            kwargs = {}
            if d in ("i2t", "a2t", "v2t"):
                if m not in pipe.config.input_projectors:
                    res.n += len(chunk)
                    bar.update(len(chunk))
                    continue
                kwargs[f"{m.value}s"] = [x.get(m) for x in media]
            out = pipe(list(prompts), seed=seed + start, progress=False, **kwargs)
            for row, dialogue in enumerate(chunk):
                ok, fields = _score(d, dialogue, prompts[row], out, row)
                res.n += 1
                res.correct += ok
                for f, v in fields.items():
                    res.field_correct[f] = res.field_correct.get(f, 0) + v
                    res.field_n[f] = res.field_n.get(f, 0) + 1
                if len(res.examples) < 5:
                    res.examples.append({"prompt": prompts[row], "target": dialogue.target.caption(),
                                         "reply": out.text[row], "ok": bool(ok)})
            bar.update(len(chunk))
    bar.close()
    return results


def format_table(results: dict[str, DirectionResult]) -> str:
    lines = [f"{'direction':<10} {'n':>4} {'accuracy':>9}  fields"]
    for d, r in results.items():
        fields = ", ".join(f"{k} {v:.0%}" for k, v in r.field_accuracy().items())
        lines.append(f"{d:<10} {r.n:>4} {r.accuracy:>9.1%}  {fields}")
    return "\n".join(lines)


# The CLI's split names (the README's); the toy world calls the seen split "train".
SPLITS = {"heldout": "heldout", "seen": "train", "train": "train"}


def eval_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--n", type=int, default=20, help="prompts per direction (default 20)")
    p.add_argument("--split", choices=list(SPLITS), default="heldout",
                   help="heldout: combinations held out of training (default); seen: combinations seen in "
                        "training ('train' is accepted for seen)")
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS,
                   help="which directions to score (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of generation (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call (default 8)")
    p.add_argument("--out", default=None, help="write the results as JSON here")


def eval_command(args: argparse.Namespace) -> int:
    from ..utils import atomic_write_text

    pipe = load_pipeline(args.model, args.config, args.device)
    results = evaluate(pipe, n=args.n, split=SPLITS[args.split], directions=args.directions, seed=args.seed,
                       batch_size=args.batch_size)
    print(format_table(results))
    if args.out:
        payload = {"split": SPLITS[args.split], "n": args.n, "seed": args.seed,
                   "directions": {d: r.to_dict() for d, r in results.items()}}
        atomic_write_text(Path(args.out), json.dumps(payload, indent=2))
        print(f"written to {args.out}", file=sys.stderr)
    return 0
