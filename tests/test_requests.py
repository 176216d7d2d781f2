"""A request for a medium that ends without one says so (issue 20, item 4): the API logs a warning and
puts it in ``AnyModalOutput.warnings``; a batch record carries a ``warning`` field."""

import json
import logging

import pytest

from anymodal.modality import Modality
from anymodal.pipeline import AnyModalOutput, missing_media_warnings, requested_media
from anymodal.processor import Message

I, A, V = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


def test_requested_media_reads_whole_words_in_any_case():
    assert requested_media("Could you DRAW a green circle?") == [I]
    assert requested_media("can you play a sine tone of A4?") == [A]
    assert requested_media("animate a red square moving left") == [V]
    assert requested_media("what colour is the background?") == []
    assert requested_media("a drawer of replays") == []  # not whole words


def test_missing_media_warnings_only_for_requests_without_the_medium():
    out = AnyModalOutput(["a green", "a red circle <image>", "large"],
                         media={I: [[], ["img"], []]})
    asked = [Message("user", "could you draw a green circle?")]
    assert missing_media_warnings(asked, out, 0, {I, A, V}) == [
        "the request asked for image ('could you draw a green circle?') but the reply 'a green' has no image"]
    assert missing_media_warnings([Message("user", "draw a red circle")], out, 1, {I}) == []
    # a question about an attached picture is not a request for one
    question = [Message("user", "what is the shape in this picture?", {I: ["x.png"]})]
    assert missing_media_warnings(question, out, 2, {I}) == []
    # a model that cannot make images is not warned about them
    assert missing_media_warnings(asked, out, 0, {A}) == []
    # "show me" reads as a request for an image, but a reply that made a video answered it
    video = AnyModalOutput(["a red cross moving up <video>"], media={V: [["frames"]]})
    assert missing_media_warnings([Message("user", "show me a red cross moving up")], video, 0, {I, V}) == []
    # a request answered only with another kind of medium says so ("triangle" is a shape and not a waveform)
    wrong = AnyModalOutput(["a low triangle at the top<image>"], media={I: [["img"]], A: [[]]})
    assert missing_media_warnings([Message("user", "play a triangle tone of G5")], wrong, 0, {I, A, V}) == [
        "the request asked for audio ('play a triangle tone of G5') but the reply 'a low triangle at the top<image>' "
        "has only image, no audio"]
    # "play a video of ..." reads as both; the video answers it
    both = AnyModalOutput(["a red cross moving up <video>"], media={V: [["frames"]], A: [[]]})
    assert missing_media_warnings([Message("user", "play a video of a red cross")], both, 0, {A, V}) == []
    # "show me" with nothing made: one warning naming both
    none = AnyModalOutput(["a red"], media={I: [[]], V: [[]]})
    assert missing_media_warnings([Message("user", "show me a red cross")], none, 0, {I, V}) == [
        "the request asked for image or video ('show me a red cross') but the reply 'a red' has no image or video"]


@pytest.fixture(scope="module")
def pipe():
    from _taught import IMG, taught_pipeline

    # a request answered with its medium, one that stops short ("a green"), and plain chat
    return taught_pipeline([("draw a cat", f"a cat {IMG}"), ("draw a green circle", "a green"), ("hello", "hi there")])


def test_api_logs_and_returns_the_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="anymodal.pipeline"):
        out = pipe(["draw a cat", "draw a green circle", "hello"], seed=0)
    assert out.text[1] == "a green" and not out.images[1]
    assert out.warnings[0] == [] and out.warnings[2] == []
    assert out.warnings[1] == ["the request asked for image ('draw a green circle') but the reply 'a green' has no image"]
    assert "prompt 1: the request asked for image" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anymodal.pipeline"):
        pipe("draw a green circle", seed=0)  # one prompt, as a chat turn: no "prompt 0"
    assert caplog.messages == ["the request asked for image ('draw a green circle') but the reply 'a green' has no image"]


def test_batch_record_carries_the_warning(pipe, tmp_path):
    from anymodal.batch import run_batch

    rows = [{"id": "a", "prompt": "draw a green circle"}, {"id": "b", "prompt": "draw a cat"}]
    list(run_batch(pipe, rows, tmp_path / "out", seed=0, progress=False))
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    assert records["a"]["status"] == "done" and "asked for image" in records["a"]["warning"]
    assert records["b"]["warning"] is None and records["b"]["files"]
