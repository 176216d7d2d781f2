"""``anymodal chat``: a multi-turn conversation in the terminal over a :class:`~anymodal.session.ChatSession`.

A command module: ``anymodal.cli`` imports it when ``anymodal chat`` runs; the session library itself knows
nothing of it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .commands import add_model_args, load_pipeline, write_outputs
from .modality import Modality, media_modalities
from .session import ChatSession, Turn

def chat_help() -> str:
    """The commands of ``anymodal chat``: one ``/NAME PATH`` per media modality, then the rest."""
    attach = [f"/{m.value} PATH".ljust(14) + f"attach one {m.value} file to the next message" for m in media_modalities()]
    rest = ["/save DIR".ljust(14) + "save the session", "/help".ljust(14) + "show this help",
            "/quit".ljust(14) + "leave (also Ctrl-D)"]
    return "Type a message and press Enter. Commands:\n" + "\n".join(f"  {line}" for line in attach + rest)


def chat_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--out", default=None, help="directory for generated media (default: a new temporary directory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first reply; reply n uses seed + n (default 0)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--load", default=None, metavar="DIR", help="continue a session saved with /save")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens the LLM may generate per reply (default: the model's llm.max_new_tokens)")


def chat_command(args: argparse.Namespace) -> int:
    import sys

    pipe = load_pipeline(args.model, args.config, args.device)
    if args.load:
        session = ChatSession.load(args.load, pipe)
    else:
        session = ChatSession(pipe, system_prompt=args.system, seed=args.seed, max_new_tokens=args.max_new_tokens)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="anymodal-chat-"))
    print(f"anymodal chat: {len(session.turns) // 2} earlier turn(s); generated media go to {out_dir}; /help for help")
    attached: dict[Modality, list[str]] = {}
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            kinds = {f"/{m.value}": m for m in media_modalities()}
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/help":
                print(chat_help())
            elif cmd in kinds:
                path = Path(arg).expanduser()
                if not arg or not path.is_file():
                    print(f"error: no such file: {arg or '(none given)'}", file=sys.stderr)
                    continue
                attached.setdefault(kinds[cmd], []).append(str(path))
                print(f"attached {kinds[cmd].value}: {path}")
            elif cmd == "/save":
                if not arg:
                    print("error: /save needs a directory", file=sys.stderr)
                    continue
                try:  # a refused directory must not end the conversation: the user picks another
                    print(f"saved: {session.save(Path(arg).expanduser())}")
                except (ValueError, OSError) as e:
                    print(f"error: {e}", file=sys.stderr)
            else:
                print(f"error: unknown command {cmd}; /help lists them", file=sys.stderr)
            continue
        live = _LiveReply() if sys.stdout.isatty() else None  # a terminal sees the reply as it is made
        try:
            reply = session.send(line, **{m.spec.plural: items for m, items in attached.items()},
                                 **(live.hooks() if live else {}))
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the session is as it was before the message
            print("\n(stopped: that message was not kept)", file=sys.stderr)
            continue
        finally:
            attached = {}
        if live is None or not live.finish(reply.text):
            print(f"anymodal> {reply.text}")
        written = _write_reply(reply, out_dir, len(session.turns) // 2)
        for kind, paths in written.items():
            for p in paths:
                print(f"{kind}: {p}")


class _LiveReply:
    """Prints a reply as it is generated: its text on stdout, then each medium's denoising steps on
    stderr, one line per medium, rewritten in place."""

    def __init__(self) -> None:
        self.shown = ""
        self.started = False
        self.line_open = False  # the reply's text line has no newline yet

    def hooks(self) -> dict:
        return {"on_text": self.on_text, "on_step": self.on_step}

    def on_text(self, text: str) -> None:
        if not self.started:
            print("anymodal> ", end="", flush=True)
            self.started = self.line_open = True
        if self.line_open and text.startswith(self.shown):  # only ever append; a rewritten end is printed whole
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def on_step(self, modality: Modality, step: int, total: int) -> None:
        import sys

        if self.line_open:
            print(flush=True)
            self.line_open = False
        print(f"\r  {modality.value}: step {step} of {total}", end="\n" if step == total else "", file=sys.stderr,
              flush=True)

    def finish(self, text: str) -> bool:
        """End the streamed reply; False if what was shown is not the whole reply (then print it whole)."""
        if self.line_open:
            print()
        return self.started and self.shown == text


def _write_reply(reply: Turn, out_dir: Path, number: int) -> dict[str, list[str]]:
    from .pipeline import AnyModalOutput

    out = AnyModalOutput([reply.text], media={m: [items] for m, items in reply.media.items()})
    written = write_outputs(out, 0, out_dir, stem=f"turn{number:03d}")
    written.pop("text", None)
    return written
