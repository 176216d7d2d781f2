"""Dialogue sessions: multi-turn context with media both ways, the context-length policy,
save -> load -> continue exactly, and the `anymodal chat` REPL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from _taught import taught_pipeline
from anymodal.media import Audio
from anymodal.modality import Modality
from anymodal.session import ChatSession

I, A = Modality.IMAGE, Modality.AUDIO


@pytest.fixture(scope="module")
def pipe():
    return taught_pipeline()


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray((np.arange(24 * 24 * 3) % 251).astype(np.uint8).reshape(24, 24, 3)).save(path)
    return path


def same_media(a, b) -> bool:
    def arr(x):
        if isinstance(x, str):  # a file sent by path: the saved copy must be byte-identical
            return np.frombuffer(open(x, "rb").read(), np.uint8)
        return x.array if isinstance(x, Audio) else np.asarray(x)

    return all(len(a.media.get(m, [])) == len(b.media.get(m, [])) and
               all(np.array_equal(arr(x), arr(y)) for x, y in zip(a.media.get(m, []), b.media.get(m, [])))
               for m in (I, A))


def spy_generate(pipe, monkeypatch) -> list:
    seen = []
    real = pipe.generate

    def spy(conversations, **kw):
        seen.append([(m.role, m.content, {k: len(v) for k, v in m.media.items()}) for m in conversations[0]])
        return real(conversations, **kw)

    monkeypatch.setattr(pipe, "generate", spy)
    return seen


def test_multi_turn_with_media_in_and_out(pipe, picture, monkeypatch):
    seen = spy_generate(pipe, monkeypatch)
    session = ChatSession(pipe, seed=0, history_media="input")
    first = session.send("draw a cat")
    assert first.text == "a cat <image>" and len(first.images) == 1 and first.images[0].size == (16, 16)
    second = session.send("what is this <image>?", images=[picture], audios=[(np.zeros(1600, np.float32), 16000)])
    assert len(session) == 4 and session.turns[2].text.startswith("<audio>")
    # the second prompt holds the first exchange, the generated image fed back, and the new media
    roles = [(role, counts) for role, _, counts in seen[1]]
    assert roles == [("user", {}), ("assistant", {I: 1}), ("user", {I: 1, A: 1})]
    assert seen[1][1][1] == "a cat <image>"
    assert second is session.turns[3] and second.role == "assistant" and second.token_ids
    assert second.text == pipe.processor.split_output(second.token_ids)[0]
    assert first.seed == 0 and second.seed == 1  # reply n uses seed + n


def test_earlier_replies_enter_the_prompt_as_the_model_produced_them(pipe, picture):
    """By default an earlier reply is its own ids: the signal block and end of turn stage 3 trains
    on, tokenised back to exactly those ids; a typed signal-token string is still escaped."""
    session = ChatSession(pipe, seed=0)
    first = session.send("draw a cat")
    session.send("what is this <image>?", images=[picture])
    messages, _ = session.context()
    reply = messages[1]
    assert reply.role == "assistant" and reply.generated and not reply.media
    proc = pipe.processor
    ids = proc.tokenizer(proc.place_media(reply.content, {}, escape=False), add_special_tokens=False)["input_ids"]
    assert ids == [i for i in first.token_ids if i != proc.tokenizer.pad_token_id]
    signal = proc.signal_ids[I]
    assert any(ids[k:k + len(signal)] == signal for k in range(len(ids)))
    typed = proc.tokenizer(proc.place_media("<img_0>", {}), add_special_tokens=False)["input_ids"]
    assert signal[0] not in typed
    # a reply without ids (a hand-written session) gets its signal block from the placeholder
    from anymodal.session import Turn
    hand = session._message(Turn("assistant", "a cat <image>", {I: first.images}))
    assert "".join(proc.signal_strings[I]) in hand.content and hand.generated


def test_history_media_is_checked_and_saved(pipe, tmp_path):
    with pytest.raises(ValueError, match="history_media must be one of signal, input"):
        ChatSession(pipe, history_media="pixels")
    session = ChatSession(pipe, seed=0, history_media="input")
    session.send("draw a cat")
    assert ChatSession.load(session.save(tmp_path / "s"), pipe).history_media == "input"


def test_generated_media_without_an_encoder_are_dropped_from_context(pipe, monkeypatch):
    session = ChatSession(pipe, seed=0, history_media="input")
    session.send("play a tone")
    assert session.turns[1].text == "a tone <audio>" and len(session.turns[1].audios) == 1
    monkeypatch.delitem(pipe.config.input_projectors, A)  # as if the model could not hear
    messages, _ = session.context()
    assert messages[1].role == "assistant" and messages[1].content == "a tone" and not messages[1].media


def test_context_policy_drops_oldest_exchanges_and_keeps_the_system_prompt(pipe, monkeypatch):
    session = ChatSession(pipe, seed=0, system_prompt="You are terse.", max_new_tokens=8)
    for _ in range(4):
        session.send("hello")
    full = session._length(session.context()[0])
    monkeypatch.setattr(pipe.processor, "max_length", full - 20)  # no longer fits whole
    seen = spy_generate(pipe, monkeypatch)
    session.send("hello")
    kept = seen[0]
    assert kept[0] == ("system", "You are terse.", {})
    assert kept[-1][:2] == ("user", "hello") and len(kept) < 1 + 9
    assert kept[1][0] == "user"  # exchanges are dropped whole
    assert session.last_context_start > 0 and len(session) == 10  # the session itself keeps every turn
    monkeypatch.setattr(pipe.processor, "max_length", 30)
    with pytest.raises(ValueError, match="too long for the model"):
        session.send("x" * 40)
    assert len(session) == 10  # unchanged


def test_save_load_continue_gives_the_same_reply(pipe, picture, tmp_path):
    session = ChatSession(pipe, seed=5)
    session.send("draw a cat")
    session.send("show and play <image>", images=[str(picture)])
    session.send("play a tone")
    saved = session.save(tmp_path / "chat")
    state = json.loads((saved / "session.json").read_text())
    assert [t["role"] for t in state["turns"]] == ["user", "assistant"] * 3
    for t in state["turns"]:
        for files in t["media"].values():
            assert all((saved / f["file"]).exists() for f in files)
    loaded = ChatSession.load(saved, pipe)
    assert [t.text for t in loaded.turns] == [t.text for t in session.turns]
    assert all(same_media(a, b) for a, b in zip(loaded.turns, session.turns))
    for prompt in ("draw a cat", "show and play"):
        a, b = session.send(prompt), loaded.send(prompt)
        assert (a.text, a.token_ids, a.seed) == (b.text, b.token_ids, b.seed)
        assert same_media(a, b)
    assert any(t.images or t.audios for t in session.turns[1::2])
    # an explicit seed gives the same reply too
    a, b = session.send("draw a cat", seed=42), loaded.send("draw a cat", seed=42)
    assert a.token_ids == b.token_ids and same_media(a, b)


def test_save_replaces_atomically_and_load_errors(pipe, tmp_path, monkeypatch):
    session = ChatSession(pipe)
    session.send("hello")
    target = session.save(tmp_path / "s")
    before = (target / "session.json").read_text()
    session.send("hello")
    import anymodal.utils as U

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(U, "swap_dir_into_place", boom)  # inside utils.atomic_dir
    with pytest.raises(OSError, match="disk full"):
        session.save(target)
    assert (target / "session.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp directories left behind
    with pytest.raises(FileNotFoundError, match="not a saved chat session"):
        ChatSession.load(tmp_path / "nothing", pipe)


def test_send_rejects_bad_input(pipe):
    session = ChatSession(pipe)
    with pytest.raises(ValueError, match="nothing to send"):
        session.send("  ")
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 2 image"):
        session.send("<image>", images=["a.png", "b.png"])
    assert len(session) == 0


def test_chat_repl(pipe, picture, tmp_path, monkeypatch, capsys):
    import anymodal.chat as chat
    import anymodal.cli as cli

    monkeypatch.setattr(chat, "load_pipeline", lambda *a: pipe)
    lines = iter(["draw a cat", f"/image {picture}", "hello", "/image nope.png", "/bogus",
                  f"/save {tmp_path / 'saved'}", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", "--config", "unused", "--out", str(tmp_path / "media")]) == 0
    out, err = capsys.readouterr()
    assert "anymodal> a cat <image>" in out
    image_line = next(line for line in out.splitlines() if line.startswith("image: "))
    assert Image.open(image_line.split(": ", 1)[1]).size == (16, 16)
    assert f"attached image: {picture}" in out
    assert "no such file: nope.png" in err and "unknown command /bogus" in err
    loaded = ChatSession.load(tmp_path / "saved", pipe)
    assert len(loaded) == 4 and loaded.turns[2].images  # the attachment went with "hello"


def test_session_settings_are_checked_and_saved(pipe, tmp_path):
    from anymodal import ImageSettings

    with pytest.raises(ValueError, match="allowed fields"):
        ChatSession(pipe, settings={"image": {"steps": 3}})
    session = ChatSession(pipe, settings={"image": ImageSettings(num_inference_steps=1, guidance_scale=1.0)})
    assert session.send("draw a cat").images
    loaded = ChatSession.load(session.save(tmp_path / "s"), pipe)
    assert loaded.settings == {"image": {"num_inference_steps": 1, "guidance_scale": 1.0, "height": None,
                                         "width": None}}


# ---------------------------------------------------------------- progress hooks (streaming, Stop)
class Stop(Exception):
    pass


def test_on_text_streams_the_reply_and_on_step_each_mediums_steps(pipe):
    session = ChatSession(pipe, seed=0)
    texts, steps = [], []
    reply = session.send("show and play", on_text=texts.append, on_step=lambda m, k, n: steps.append((m, k, n)))
    assert reply.text == "both <image> and <audio>" and texts[-1] == reply.text
    assert len(set(texts)) >= 4 and texts[0] == "b"  # token by token, not the whole reply at once
    assert texts.index("both <image>") < texts.index("both <image> and")  # a signal block shows as its placeholder
    for m in (I, A):
        n = pipe.generators[m].make_settings().num_inference_steps
        assert [(k, total) for mm, k, total in steps if mm is m] == [(k, n) for k in range(1, n + 1)]


def test_on_text_of_a_batch_gives_each_prompts_reply(pipe):
    seen = []
    out = pipe(["draw a cat", "hello"], seed=0, on_text=seen.append)
    assert all(len(texts) == 2 for texts in seen) and seen[-1] == out.text == ["a cat <image>", "hi there"]


def test_a_hook_that_raises_stops_the_turn_and_the_session_keeps_only_finished_turns(pipe):
    session = ChatSession(pipe, seed=0)
    steps = []

    def stop_at_first_step(m, k, n):
        steps.append((m, k))
        raise Stop

    with pytest.raises(Stop):
        session.send("show and play", on_step=stop_at_first_step)
    assert steps == [(I, 1)] and session.turns == []
    first = session.send("show and play")  # what it would have been had nothing been stopped
    assert first.text == "both <image> and <audio>" and same_media(first, ChatSession(pipe, seed=0).send("show and play"))
    kept = list(session.turns)
    texts = []

    def stop_at_third_token(text):
        texts.append(text)
        if len(texts) == 3:
            raise Stop

    with pytest.raises(Stop):
        session.send("draw a cat", on_text=stop_at_third_token)
    assert len(texts) == 3 and session.turns == kept
    again = session.send("draw a cat")
    fresh = ChatSession(pipe, seed=0)
    fresh.send("show and play")
    expected = fresh.send("draw a cat")
    assert again.text == expected.text and same_media(again, expected)


def test_chat_repl_streams_to_a_terminal_and_ctrl_c_stops_a_reply(pipe, tmp_path, monkeypatch, capsys):
    import sys

    import anymodal.chat as chat
    import anymodal.cli as cli

    monkeypatch.setattr(chat, "load_pipeline", lambda *a: pipe)
    real_send, calls = ChatSession.send, []

    def ctrl_c(text):
        raise KeyboardInterrupt

    def send(self, *args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:  # the first message is interrupted at its first token
            kwargs["on_text"] = ctrl_c
        return real_send(self, *args, **kwargs)

    monkeypatch.setattr(ChatSession, "send", send)
    lines = iter(["draw a cat", "show and play", f"/save {tmp_path / 'saved'}", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cli.main(["chat", "--config", "unused", "--out", str(tmp_path / "media")]) == 0
    out, err = capsys.readouterr()
    assert "(stopped: that message was not kept)" in err
    assert "anymodal> both <image> and <audio>\n" in out and out.count("anymodal> ") == 1  # streamed, printed once
    n = pipe.generators[I].make_settings().num_inference_steps
    assert f"\r  image: step {n} of {n}\n" in err and "audio: step 1 of" in err
    assert all("on_text" in kw and "on_step" in kw for kw in calls)
    assert [t.text for t in ChatSession.load(tmp_path / "saved", pipe).turns] == ["show and play", "both <image> and <audio>"]


@pytest.mark.parametrize("edit, field", [
    (lambda s: s["turns"][0].pop("role"), r"turns\[0\] has no 'role'"),
    (lambda s: s["turns"][1].update(role="robot"), r"turns\[1\]\.role must be 'user' or 'assistant'"),
    (lambda s: s.update(seed="zero"), r"'seed' is invalid: seed must be an integer"),
    (lambda s: s["turns"][1].update(seed=[1]), r"turns\[1\]\.seed is invalid"),
    (lambda s: s["turns"][0].update(text=None), r"turns\[0\]\.text must be a string"),
    (lambda s: s["turns"][1].update(token_ids=["a"]), r"turns\[1\]\.token_ids must be a list"),
    (lambda s: s["turns"][1].update(media={"image": "x.png"}), r"turns\[1\]\.media\.image must be a list"),
    (lambda s: s["turns"][1].update(media={"smell": []}), r"turns\[1\]\.media has an unknown modality 'smell'"),
    (lambda s: s.update(turns={}), r"'turns' must be a list"),
    (lambda s: s.update(max_new_tokens=0), r"'max_new_tokens' is invalid"),
    (lambda s: s.update(last_context_start=9), r"'last_context_start' must be an integer in \[0, 2\]"),
    (lambda s: s.update(settings={"image": {"height": "tall"}}), r"'settings' is invalid"),
])
def test_a_bad_session_file_is_refused_at_load_naming_the_field(pipe, tmp_path, edit, field):
    session = ChatSession(pipe, seed=0)
    session.send("draw a cat")
    saved = session.save(tmp_path / "s")
    state = json.loads((saved / "session.json").read_text())
    edit(state)
    (saved / "session.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=field) as e:
        ChatSession.load(saved, pipe)
    assert str(saved / "session.json") in str(e.value)  # names the file too
    assert len(str(e.value).splitlines()) == 1


def test_a_session_file_that_is_not_an_object_is_refused(pipe, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "session.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        ChatSession.load(tmp_path / "s", pipe)
