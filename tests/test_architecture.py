"""docs/architecture.md, executed: the path of one prompt and the add-a-generator example."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anymodal import AnyModalConfig, AnyModalPipeline
from anymodal.generators import ImageSettings, ModalityGenerator
from anymodal.modality import Modality
from anymodal.registry import register_generator

from _taught import taught_pipeline
from conftest import CONFIGS, ForceFirst


@pytest.fixture(scope="module")
def saved_taught(tmp_path_factory) -> Path:
    """The taught tiny pipeline ("draw a cat" -> a caption and an image), saved."""
    path = tmp_path_factory.mktemp("taught") / "pipe"
    taught_pipeline().save_pretrained(path)
    return path


def _record(monkeypatch, calls: list[str], owner, name: str, label: str) -> None:
    import inspect

    original = inspect.getattr_static(owner, name)  # may be inherited
    is_classmethod = isinstance(original, classmethod)
    func = original.__func__ if is_classmethod else original

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        calls.append(label)
        return func(*args, **kwargs)

    monkeypatch.setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)


def _first_occurrences(calls: list[str]) -> list[str]:
    seen: list[str] = []
    for c in calls:
        if c not in seen:
            seen.append(c)
    return seen


def test_the_path_of_one_prompt(saved_taught, tmp_path, monkeypatch):
    import anymodal.cli as cli
    import anymodal.commands as commands
    import anymodal.generation as generation
    import anymodal.pipeline as pipeline
    from anymodal.encoders.imagebind import ImageBindEncoder
    from anymodal.generators.image import StableDiffusionGenerator
    from anymodal.model import AnyModalModel
    from anymodal.processor import AnyModalProcessor

    calls: list[str] = []
    steps = [  # docs/architecture.md, "The path of one prompt", in order
        (commands, "generate_command", "1 generate_command"),
        (commands, "load_pipeline", "1 load_pipeline"),
        (pipeline.AnyModalPipeline, "from_pretrained", "1 from_pretrained"),
        (pipeline.AnyModalPipeline, "__call__", "2 __call__"),
        (pipeline, "_rows_of_media", "2 _rows_of_media"),
        (pipeline.AnyModalPipeline, "generate", "2 generate"),
        (pipeline.AnyModalPipeline, "resolve_settings", "2 resolve_settings"),
        (AnyModalProcessor, "prepare", "3 prepare"),
        (AnyModalProcessor, "place_media", "3 place_media"),
        (AnyModalProcessor, "format", "3 format"),
        (AnyModalProcessor, "__call__", "3 tokenize"),
        (ImageBindEncoder, "preprocess", "3 preprocess"),
        (AnyModalModel, "encode_media", "4 encode_media"),
        (pipeline, "generate_text", "5 generate_text"),
        (AnyModalModel, "embed", "5 embed"),
        (generation.SignalSpanForcing, "__call__", "5 SignalSpanForcing"),
        (AnyModalProcessor, "split_output", "5 split_output"),
        (AnyModalModel, "project_signal", "6 project_signal"),
        (StableDiffusionGenerator, "generate", "7 generator.generate"),
        (commands, "write_outputs", "8 write_outputs"),
    ]
    for owner, name, label in steps:
        _record(monkeypatch, calls, owner, name, label)

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    out = tmp_path / "out"
    assert cli.main(["generate", "draw a cat", "--model", str(saved_taught), "--out", str(out),
                     "--image", str(image), "--seed", "0", "--steps", "2"]) == 0
    order = _first_occurrences(calls)
    assert order == [label for _, _, label in steps], order
    assert (out / "image_0.png").is_file() and (out / "text.txt").is_file()


# ----------------------------------------------------------------------------- adding a generator
class SolidColourGenerator(ModalityGenerator):
    """Paints the whole image in one colour, read from a (1, 3) conditioning tensor."""

    type_name = "solid-colour"
    modality = Modality.IMAGE
    settings_class = ImageSettings

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @property
    def conditioning_shapes(self):
        return {"colour": (1, 3)}

    def encode_text(self, texts):
        return {"colour": torch.zeros(len(texts), 1, 3)}

    def generate(self, conditioning, settings=None, generator=None, progress=False):
        settings = self.make_settings(settings)
        size = settings.height or 8
        rgb = (torch.sigmoid(conditioning["colour"][:, 0].float()) * 255).round().to(torch.uint8)
        return [Image.new("RGB", (size, size), tuple(c)) for c in rgb.tolist()]

    def save_pretrained(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)

    def to(self, device):
        return self


@pytest.fixture
def solid_colour_registered():
    """The docs' ``@register_generator("solid-colour")``, undone afterwards: the registry is global, and
    other tests enumerate its built-in types."""
    from anymodal.registry import GENERATORS

    register_generator("solid-colour")(SolidColourGenerator)
    yield
    GENERATORS._entries.pop("solid-colour", None)


def test_add_a_generator(tmp_path, solid_colour_registered):
    data = AnyModalConfig.from_yaml(CONFIGS / "tiny.yaml").to_dict()
    data["generators"] = {"image": {"type": "solid-colour", "components": {}}}
    proj = dict(data["output_projectors"]["image"])
    proj.pop("targets")  # taken from the generator's conditioning_shapes
    data["output_projectors"] = {"image": proj}
    torch.manual_seed(0)
    pipe = AnyModalPipeline.from_config(AnyModalConfig.from_dict(data))
    first = pipe.processor.signal_ids[Modality.IMAGE][0]
    n = len(pipe.processor.signal_ids[Modality.IMAGE])
    out = pipe("paint", seed=0, max_new_tokens=n, logits_processor=[ForceFirst(first)])
    (image,) = out.images[0]
    assert image.size == (8, 8) and len(set(image.getdata())) == 1
    assert pipe.config.output_projectors[Modality.IMAGE].targets == {"colour": [1, 3]}

    pipe.save_pretrained(tmp_path / "saved")
    again = AnyModalPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(again.generators[Modality.IMAGE], SolidColourGenerator)
    (image2,) = again("paint", seed=0, max_new_tokens=n, logits_processor=[ForceFirst(first)]).images[0]
    assert np.abs(np.asarray(image, float) - np.asarray(image2, float)).max() <= 1
