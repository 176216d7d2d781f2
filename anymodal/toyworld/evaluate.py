"""``anymodal eval``: score a model on toy-world prompts with analytic checkers no model wrote.

Each direction draws dialogues of one task from the world (held-out combinations by default),
runs the model on the user turn, and scores the reply:

    t2i  the generated image's foreground colour, shape, size and position and its background, each
         where the request names it (pixel statistics)
    t2a  the generated audio's fundamental frequency (FFT) and duration
    t2v  the generated video's direction of motion
    i2t, a2t, v2t  the text answer to a question about the given medium

A reply with no medium of the asked kind counts as wrong.

``style="paraphrase"`` asks each request and question in the world's held-out wordings
(``world.ask_for`` / ``ask_about`` with ``forms="heldout"``: forms training never uses).
:func:`evaluate_sessions` scores multi-turn sessions turn by turn through a ``ChatSession``, and
sends each later request and question again alone (a fresh session, the same seed): the issue's
measure of dialogue is the ratio of the two on the same turns, not a comparison with other prompts.
Each direction draws its prompts and seeds its generators from ``(seed, direction)`` alone, so a
direction scores the same whether it runs alone or with others. Figures carry Wilson 95%
intervals.
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

SPLITS = {"heldout": "heldout", "seen": "train", "train": "train"}  # the CLI's split names (the docs': seen) -> the world's

DIRECTIONS = ("t2i", "t2a", "t2v", "i2t", "a2t", "v2t")
# The fields each generation direction is judged on (those its prompt leaves unsaid are skipped).
# Every image field a request can name: scoring colour and shape alone passed an image generator that
# drew "on the left" at the top (docs/toyworld.md, "Twice the UNet steps").
HEADLINE_FIELDS = {"t2i": ("colour", "shape", "size", "position", "background"), "t2a": ("note", "duration"),
                   "t2v": ("direction",)}
# the kinds of session turn `anymodal eval --sessions` reports apart
TURN_KINDS = ("first", "later", "edit")
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

    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def to_dict(self) -> dict[str, Any]:
        d = {"direction": self.direction, **self.summary(), "field_accuracy": self.field_accuracy(),
             "examples": self.examples}
        if self.later is not None and self.alone is not None:
            d["later_turns_in_session"], d["same_turns_alone"] = self.later.summary(), self.alone.summary()
            d["session_ratio"] = self.session_ratio
        if self.by_kind is not None:
            d["by_kind"] = {k: r.summary() for k, r in self.by_kind.items()}
        return d

    @property
    def session_ratio(self) -> float | None:
        """In-session accuracy of the later turns over the same turns' accuracy alone (None without
        such turns, or when none was right alone)."""
        if self.later is None or self.alone is None or not self.alone.correct:
            return None
        return self.later.accuracy / self.alone.accuracy

    # sessions only: this direction's requests and questions after the first turn, as scored in their
    # session (``later``) and sent again alone in a fresh session with the same seed (``alone``)
    later: "DirectionResult | None" = None
    alone: "DirectionResult | None" = None
    # sessions only: the same turns split by kind (``TURN_KINDS``: a session's first turn, a later
    # request or question, an edit of the medium before)
    by_kind: "dict[str, DirectionResult] | None" = None

    def summary(self) -> dict[str, Any]:
        lo, hi = self.interval()
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy, "ci95": [round(lo, 4), round(hi, 4)]}

    def add(self, ok: bool, fields: dict[str, bool]) -> None:
        self.n += 1
        self.correct += ok
        for f, v in fields.items():
            self.field_correct[f] = self.field_correct.get(f, 0) + v
            self.field_n[f] = self.field_n.get(f, 0) + 1


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of ``k`` successes in ``n`` trials (sound at 0% and 100%, unlike
    the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def direction_rng(seed: int, direction: str) -> np.random.Generator:
    """The prompts of ``direction`` come from ``(seed, direction)`` alone: a direction's figure does
    not depend on which directions ran before it."""
    return np.random.default_rng([seed, DIRECTIONS.index(direction)])


def _turn_inputs(turn: dict[str, Any]) -> tuple[str, dict[Modality, list]]:
    """A user turn's text and its media by modality (audio as ``(waveform, sample_rate)``)."""
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


def score_reply(direction: str, target: world.Spec, question: str | None, prompt: str | None, text: str,
                made: list | None, asked: world.Spec | None = None) -> tuple[bool, dict[str, bool]]:
    """Score one reply: a generated medium (``made``, the reply's media of the direction's kind) on the
    fields the request names (``asked``, else the fields ``prompt`` reads back as, else the target's),
    or a text answer to ``question``."""
    if direction in HEADLINE_FIELDS:
        asked = asked or (world.parse_caption(prompt) if prompt else None) or target
        names = [f for f in HEADLINE_FIELDS[direction] if getattr(asked, f, None) is not None]
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
    ok = checkers.check_answer(question, text, target)
    return ok, {question: ok}


def evaluate(pipe, n: int = 20, split: str = "heldout", directions: Sequence[str] = DIRECTIONS, seed: int = 0,
             batch_size: int = 8, progress: bool = True, style: str = "plain") -> dict[str, DirectionResult]:
    """Score ``pipe`` on ``n`` toy-world prompts per direction. Directions whose modality the
    model cannot take or make are scored 0 (every reply lacks what was asked). ``style``:
    "plain" (the training templates' wording) or "paraphrase" (held-out wordings)."""
    from tqdm.auto import tqdm

    split = SPLITS.get(split, split)
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}; expected some of: {', '.join(DIRECTIONS)}")
    if style not in world.STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of: {', '.join(world.STYLES)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    results: dict[str, DirectionResult] = {}
    bar = tqdm(total=n * len(directions), desc="eval", unit="prompt", disable=not progress)
    for d in directions:
        res = results[d] = DirectionResult(d)
        rng = direction_rng(seed, d)
        dialogues = [world.sample_dialogue(rng, split=split, tasks=[d]) for _ in range(n)]
        if style == "paraphrase":
            dialogues = [world.rephrase(x, rng, "heldout") for x in dialogues]
        for start in range(0, n, batch_size):
            chunk = dialogues[start:start + batch_size]
            prompts, media = zip(*[_turn_inputs(x.turns[0]) for x in chunk])
            m = _MEDIA[d]
            kwargs = {}
            if d in ("i2t", "a2t", "v2t"):
                if m not in pipe.config.input_projectors:
                    res.n += len(chunk)
                    bar.update(len(chunk))
                    continue
                kwargs[f"{m.value}s"] = [x.get(m) for x in media]
            out = pipe(list(prompts), seed=seed + 1000 * DIRECTIONS.index(d) + start, progress=False, **kwargs)
            for row, dialogue in enumerate(chunk):
                # judge what was asked: a reworded request records it (dialogue.asked), a canonical one reads back
                ok, fields = score_reply(d, dialogue.target, dialogue.question, prompts[row], out.text[row],
                                         out.media[m][row] if d in HEADLINE_FIELDS else None, asked=dialogue.asked)
                res.add(ok, fields)
                if len(res.examples) < 5:
                    res.examples.append({"prompt": prompts[row], "target": dialogue.target.caption(),
                                         "reply": out.text[row], "ok": bool(ok)})
            bar.update(len(chunk))
    bar.close()
    return results


def evaluate_sessions(pipe, n_sessions: int = 40, split: str = "heldout", seed: int = 0, progress: bool = True,
                      forms: str | None = None, alone: bool = True) -> dict[str, DirectionResult]:
    """Score ``n_sessions`` multi-turn sessions (3-5 mixed turns: requests, edits of the last medium,
    questions about an attached medium; ``world.sample_session``) turn by turn through a
    :class:`~anymodal.session.ChatSession`, per direction (an edit counts as its medium's generation
    direction, judged on every headline field of the edited spec).

    With ``alone`` (default), every request and question after a session's first turn is also sent
    on its own, in a fresh session seeded as that turn was, and each direction's ``later`` and
    ``alone`` hold the two scores of those same turns (edits have no single-turn counterpart: they
    refer to the turn before). Each direction's ``examples`` records every turn (session, turn,
    kind, prompt, target, reply, ok; ``alone_reply`` and ``alone_ok`` where it was sent alone)."""
    from tqdm.auto import tqdm

    from ..session import ChatSession

    split = SPLITS.get(split, split)
    rng = np.random.default_rng([seed, 99])
    sessions = [world.sample_session(rng, split, forms=forms) for _ in range(n_sessions)]
    results = {d: DirectionResult(d) for d in DIRECTIONS}
    for r in results.values():
        r.by_kind = {k: DirectionResult(r.direction) for k in TURN_KINDS}
    if alone:
        for r in results.values():
            r.later, r.alone = DirectionResult(r.direction), DirectionResult(r.direction)
    def turn_kind(check: dict[str, Any]) -> str:  # one of TURN_KINDS
        return "edit" if check["kind"] == "edit" else "later" if check["turn"] > 0 else "first"

    def sent_alone(check: dict[str, Any]) -> bool:  # a later request or question (an edit refers to the turn before)
        return alone and turn_kind(check) == "later"

    paired = sum(sent_alone(c) for s in sessions for c in s.checks)
    bar = tqdm(total=sum(len(s.checks) for s in sessions) + paired, desc="eval sessions", unit="turn",
               disable=not progress)
    for k, sess in enumerate(sessions):
        chat = ChatSession(pipe, seed=seed + 7919 * k)
        for check in sess.checks:
            text, by_modality = _turn_inputs(sess.turns[check["turn"]])
            media = {f"{m.value}s": items for m, items in by_modality.items()}
            d, target = check["direction"], check["target"]

            def score(reply) -> tuple[bool, dict[str, bool]]:
                made = reply.media.get(_MEDIA[d], []) if d in HEADLINE_FIELDS else None
                return score_reply(d, target, check["question"], None, reply.text, made,
                                   asked=check.get("asked") or target)

            reply = chat.send(text, **media)
            ok, fields = score(reply)
            results[d].add(ok, fields)
            results[d].by_kind[turn_kind(check)].add(ok, fields)
            record = {"session": k, "turn": check["turn"] // 2 + 1, "kind": check["kind"], "prompt": text,
                      "target": target.caption(), "reply": reply.text, "ok": bool(ok)}
            results[d].examples.append(record)  # every turn: sessions are few, and failures need reading
            bar.update(1)
            if sent_alone(check):
                by_itself = ChatSession(pipe, seed=reply.seed).send(text, **media)
                ok_alone, fields_alone = score(by_itself)
                results[d].later.add(ok, fields)
                results[d].alone.add(ok_alone, fields_alone)
                record.update(alone_reply=by_itself.text, alone_ok=bool(ok_alone))
                bar.update(1)
    bar.close()
    return results


def format_table(results: dict[str, DirectionResult]) -> str:
    lines = [f"{'direction':<10} {'n':>4} {'accuracy':>9}  {'95% CI':<13}  fields"]
    for d, r in results.items():
        fields = ", ".join(f"{k} {v:.0%}" for k, v in r.field_accuracy().items())
        lo, hi = r.interval()
        lines.append(f"{d:<10} {r.n:>4} {r.accuracy:>9.1%}  {f'{lo:.0%}-{hi:.0%}':<13}  {fields}")
    kinds = {d: r.by_kind for d, r in results.items() if r.by_kind is not None}
    if kinds:
        lines += ["", "session turns by kind, right / turns",
                  f"{'direction':<10} {'first turns':>12} {'later requests/questions':>25} {'edits':>8}"]
        for d, by in kinds.items():
            cells = [f"{by[k].correct}/{by[k].n}" if by[k].n else "-" for k in TURN_KINDS]
            lines.append(f"{d:<10} {cells[0]:>12} {cells[1]:>25} {cells[2]:>8}")
    paired = {d: r for d, r in results.items() if r.later is not None and r.alone is not None}
    if paired:
        lines += ["", "requests and questions after the first turn: in their session / the same turns alone",
                  f"{'direction':<10} {'n':>4} {'in session':>11} {'alone':>7} {'ratio':>7}"]
        for d, r in paired.items():
            ratio = "-" if r.session_ratio is None else f"{r.session_ratio:.0%}"
            lines.append(f"{d:<10} {r.later.n:>4} {r.later.accuracy:>11.1%} {r.alone.accuracy:>7.1%} {ratio:>7}")
    return "\n".join(lines)


def eval_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--n", type=int, default=20, help="prompts per direction (default 20)")
    p.add_argument("--split", choices=["heldout", "seen", "train"], default="heldout",
                   help="held-out combinations (default) or combinations seen in training ('seen'; 'train' is the same)")
    p.add_argument("--style", choices=list(world.STYLES), default="plain",
                   help="plain: the training templates' wording (default); paraphrase: held-out wordings")
    p.add_argument("--sessions", type=int, default=0, metavar="N",
                   help="instead, score N multi-turn sessions (3-5 mixed turns each) turn by turn")
    p.add_argument("--no-alone", action="store_true",
                   help="with --sessions: skip sending each later request and question again alone (the "
                        "default compares the two on the same turns)")
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS,
                   help="directions to score (default: all six)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the generators (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call (default 8)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def eval_command(args: argparse.Namespace) -> int:
    from ..utils import atomic_write_text

    pipe = load_pipeline(args.model, args.config, args.device)
    progress = not args.no_progress
    if args.sessions:
        results = evaluate_sessions(pipe, args.sessions, split=args.split, seed=args.seed, progress=progress,
                                    alone=not args.no_alone)
    else:
        results = evaluate(pipe, n=args.n, split=args.split, directions=args.directions, seed=args.seed,
                           batch_size=args.batch_size, style=args.style, progress=progress)
    print(format_table(results))
    if args.out:
        payload = {"split": SPLITS[args.split], "n": args.n, "seed": args.seed,
                   "style": args.style, "sessions": args.sessions,
                   "directions": {d: r.to_dict() for d, r in results.items()}}
        atomic_write_text(Path(args.out), json.dumps(payload, indent=2))
        print(f"written to {args.out}", file=sys.stderr)
    return 0
