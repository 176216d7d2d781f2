"""`anymodal eval`: an oracle that answers from the world's own renderer scores 100%; a random
tiny model scores (near) 0."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from anymodal import Audio, AnyModalPipeline, Modality
from anymodal.pipeline import AnyModalOutput
from anymodal.toyworld import checkers, world
from anymodal.toyworld.evaluate import DIRECTIONS, evaluate, format_table
from conftest import CONFIGS


class Oracle:
    """Answers like a perfect model: renders what the prompt describes, reads what it is shown."""

    config = SimpleNamespace(input_projectors={Modality.IMAGE: 1, Modality.AUDIO: 1, Modality.VIDEO: 1})

    def __call__(self, prompts, images=None, audios=None, videos=None, seed=0, progress=False):
        out = AnyModalOutput(text=[], images=[[] for _ in prompts], audios=[[] for _ in prompts],
                             videos=[[] for _ in prompts])
        for i, prompt in enumerate(prompts):
            given = [(m, x[i]) for m, x in ((Modality.IMAGE, images), (Modality.AUDIO, audios),
                                            (Modality.VIDEO, videos)) if x is not None and x[i]]
            if given:  # answer any question with the full caption of what the checkers read
                m, (item,) = given[0]
                reading = {Modality.IMAGE: lambda: checkers.read_image(item),
                           Modality.AUDIO: lambda: checkers.read_audio(item[0], item[1]),
                           Modality.VIDEO: lambda: checkers.read_video(item)}[m]()
                cls = {Modality.IMAGE: world.ImageSpec, Modality.AUDIO: world.AudioSpec,
                       Modality.VIDEO: world.VideoSpec}[m]
                spec = cls(**{f.name: getattr(reading, f.name) for f in dataclasses.fields(cls)})
                out.text.append(spec.caption())
                continue
            spec = world.complete_spec(world.parse_caption(prompt), 0)
            arr = world.render(spec, 0)
            if isinstance(spec, world.ImageSpec):
                out.images[i].append(world.to_pil(arr))
            elif isinstance(spec, world.AudioSpec):
                out.audios[i].append(Audio(arr, world.SAMPLE_RATE))
            else:
                out.videos[i].append([world.to_pil(f) for f in arr])
            out.text.append(spec.caption())
        return out


class ShortAudio(Oracle):
    """Makes audio too short for the checkers to read, as the random tiny model does (1024 samples)."""

    def __call__(self, prompts, **kw):
        out = super().__call__(prompts, **kw)
        for row in out.audios:
            row[:] = [Audio(a.array[:1024], a.sample_rate) for a in row]
        return out


def test_unreadable_generated_media_score_zero_instead_of_failing_the_run():
    results = evaluate(ShortAudio(), n=3, directions=["t2a", "t2i"], progress=False)
    assert results["t2a"].accuracy == 0.0 and results["t2i"].accuracy == 1.0


def test_oracle_scores_full_marks():
    results = evaluate(Oracle(), n=6, progress=False)
    assert set(results) == set(DIRECTIONS)
    for d, r in results.items():
        assert r.n == 6
        assert r.accuracy == 1.0, (d, r.examples)


def test_random_tiny_model_scores_below_the_floor(tmp_path, capsys):
    from anymodal.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--config", str(CONFIGS / "tiny.yaml"), "--n", "3", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["directions"]) == set(DIRECTIONS)
    for d, r in data["directions"].items():
        assert r["n"] == 3 and r["accuracy"] <= 0.34, d
    assert "direction" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown direction 't2x'"):
        evaluate(Oracle(), directions=["t2x"])
    with pytest.raises(ValueError, match="n must be at least 1"):
        evaluate(Oracle(), n=0)
