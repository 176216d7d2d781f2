"""Tests that notice what a user would notice: the samples in a saved WAV, the rate of a session's
audio after reloading it, every medium of a turn surviving a save, and which seed a medium was drawn
with.

Each of these once let a mutation of core behaviour pass the whole suite (issue 24): saved audio
cast to int16 (every WAV silent), a session's audio saved at the wrong rate, a turn's media of one
type overwriting each other on save, and ``seed + k`` per medium replaced by ``seed`` or by
``seed + row``. ``bench/mutations.py`` keeps those mutations, and others, with the tests that must
catch them.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from _taught import EXAMPLES, IMG, taught_pipeline
from anymodal.media import Audio
from anymodal.modality import Modality
from anymodal.session import ChatSession, Turn

I, A = Modality.IMAGE, Modality.AUDIO
PCM_STEP = 1 / 32767  # one step of 16-bit PCM: the most a WAV writer may round a sample in [-1, 1]


@pytest.fixture(scope="module")
def pipe():
    # "two cats" asks for two images in one reply: media k of a prompt, k > 0
    return taught_pipeline(EXAMPLES + [("two cats", f"cats {IMG} {IMG}")])


def tone(rate: int, seconds: float = 0.25, hz: float = 440.0, amplitude: float = 0.8) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


# ------------------------------------------------------------------ saved audio
def test_a_saved_wav_holds_the_waveform(tmp_path):
    wave = tone(16000)
    path = Audio(wave, 16000).save(tmp_path / "a.wav")
    data, rate = sf.read(path, dtype="float32")
    assert rate == 16000 and data.shape == wave.shape
    assert np.sqrt(np.mean(data ** 2)) > 0.5  # not silent: a 0.8 sine has an RMS of 0.57
    np.testing.assert_allclose(data, wave, atol=PCM_STEP + 1e-7, rtol=0)


def test_generated_audio_written_by_the_cli_is_the_generated_waveform(pipe, tmp_path, capsys, monkeypatch):
    """What `anymodal generate` writes is what the generator made, sample for sample. (The tiny
    generator's own output is below one PCM step, so it renders a known tone here.)"""
    from anymodal import cli

    pipe.save_pretrained(tmp_path / "m")
    made = []

    def render(self, conditioning, settings=None, rng=None, progress=False):
        n = next(iter(conditioning.values())).shape[0]
        made.extend(Audio(tone(16000, hz=300.0 + 100 * len(made)), 16000) for _ in range(n))
        return made[-n:]

    monkeypatch.setattr(type(pipe.generators[A]), "render", render)
    assert cli.main(["generate", "play a tone", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 0
    assert "audio: " in capsys.readouterr().out
    data, rate = sf.read(tmp_path / "o" / "audio_0.wav", dtype="float32")
    assert len(made) == 1 and rate == 16000 and data.shape == made[0].array.shape
    assert np.sqrt(np.mean(data ** 2)) > 0.5
    np.testing.assert_allclose(data, made[0].array, atol=PCM_STEP + 1e-7, rtol=0)


# ------------------------------------------------------------------ sessions
def test_a_sessions_audio_keeps_its_rate_and_samples_on_reload(pipe, tmp_path):
    session = ChatSession(pipe, seed=0)
    sent = [Audio(tone(22050), 22050), (tone(8000, hz=300.0), 8000)]
    reply = session.send("play a tone")  # a generated clip, at the generator's rate
    assert len(reply.audios) == 1
    session.turns.append(Turn("user", "<audio> <audio>", {A: list(sent)}))
    session.save(tmp_path / "s")
    loaded = ChatSession.load(tmp_path / "s", pipe)
    got = loaded.turns[2].audios
    assert [a.sample_rate for a in got] == [22050, 8000]
    np.testing.assert_array_equal(got[0].array, sent[0].array)
    np.testing.assert_array_equal(got[1].array, sent[1][0])
    generated, again = reply.audios[0], loaded.turns[1].audios[0]
    assert again.sample_rate == generated.sample_rate == pipe.generators[A].sample_rate
    np.testing.assert_array_equal(again.array, generated.array)


def test_every_medium_of_a_turn_survives_save_and_reload(pipe, tmp_path):
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    paths = []
    for name, rgb in (("a.png", (0, 255, 0)), ("b.png", (9, 9, 9))):
        Image.new("RGB", (8, 8), rgb).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    session = ChatSession(pipe, seed=0)
    session.turns.append(Turn("user", "<image> <image>", {I: [red, blue]}))
    session.turns.append(Turn("user", "<image> <image>", {I: paths}))
    session.turns.append(Turn("user", "<audio> <audio>", {A: [Audio(tone(16000), 16000),
                                                             Audio(tone(16000, hz=880.0), 16000)]}))
    session.save(tmp_path / "s")
    loaded = ChatSession.load(tmp_path / "s", pipe)
    first, second, third = loaded.turns
    assert [np.asarray(im).tolist() for im in first.images] == [np.asarray(red).tolist(), np.asarray(blue).tolist()]
    assert [open(p, "rb").read() for p in second.images] == [open(p, "rb").read() for p in paths]
    assert len(set(second.images)) == 2
    assert not np.array_equal(third.audios[0].array, third.audios[1].array)
    np.testing.assert_array_equal(third.audios[1].array, tone(16000, hz=880.0))


# ------------------------------------------------------------------ seeds
def _seeds_drawn(pipe, monkeypatch) -> list[list[int]]:
    """The seed of each random number generator handed to the image generator, per render call."""
    calls = []
    gen = pipe.generators[I]
    real = gen.render

    def spy(conditioning, settings=None, rng=None, progress=False):
        calls.append([g.initial_seed() for g in rng])
        return real(conditioning, settings, rng=rng, progress=progress)

    monkeypatch.setattr(gen, "render", spy)
    return calls


def test_media_k_of_a_prompt_use_seed_plus_k_alone_or_in_a_batch(pipe, monkeypatch):
    calls = _seeds_drawn(pipe, monkeypatch)
    out = pipe("two cats", seed=5)
    assert len(out.images[0]) == 2 and calls == [[5, 6]]
    calls.clear()
    out = pipe(["draw a cat", "two cats", "hello", "two cats"], seed=5)
    assert [len(x) for x in out.images] == [1, 2, 0, 2]
    assert calls == [[5, 5, 6, 5, 6]]  # row by row; each row's media from seed + k, whatever the row


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(int)


def test_a_batch_row_gives_what_the_same_prompt_gives_alone(pipe):
    alone = pipe("two cats", seed=7).images[0]
    batch = pipe(["draw a cat", "two cats"], seed=7).images
    other = pipe("two cats", seed=8).images[0]
    for k in range(2):
        # batched and single UNet passes may round differently in the last bits
        assert np.abs(_pixels(batch[1][k]) - _pixels(alone[k])).max() <= 2, k
    assert np.abs(_pixels(batch[0][0]) - _pixels(pipe("draw a cat", seed=7).images[0][0])).max() <= 2
    # and the seed matters, so the comparisons above could fail
    assert np.abs(_pixels(other[0]) - _pixels(alone[0])).mean() > 5
    # image 1 is drawn with seed + 1: the same noise as image 0 of seed + 1
    assert np.abs(_pixels(other[0]) - _pixels(alone[1])).mean() < np.abs(_pixels(other[0]) - _pixels(alone[0])).mean()


def test_a_generator_seed_is_used_for_every_medium(pipe, monkeypatch):
    """With ``generator=`` (diffusers' way) the caller's generator is handed over as it is."""
    gen = pipe.generators[I]
    seen = []
    real = gen.render

    def spy(conditioning, settings=None, rng=None, progress=False):
        seen.append(rng)
        return real(conditioning, settings, rng=rng, progress=progress)

    monkeypatch.setattr(gen, "render", spy)
    g = torch.Generator().manual_seed(11)
    pipe("two cats", generator=g)
    assert seen == [g]
