"""Shared by the NExT-GPT real-size tests: tiny real-shaped stand-ins (bench/standins.py) and a converter call."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from anymodal.convert.nextgpt import convert_nextgpt
from anymodal.processor import AnyModalProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from standins import Size, write_delta, write_vicuna  # noqa: E402

TINY = Size(vocab=400, hidden=32, layers=2, heads=4, ffn=64, lora_r=4, imagebind_dim=32, d_model=16, proj_heads=4,
            proj_layers=1, proj_ffn=32, outputs={"image": ("gen_text_hidden_fcs.0.", 16, 32),  # tiny.yaml's
                                                 "video": ("gen_text_hidden_fcs_video.0.", 16, 32),  # generators
                                                 "audio": ("gen_text_hidden_fcs_audio.0.", 1, 32)})


def imagebind_file(tmp: Path) -> Path:
    from safetensors.torch import save_file

    from anymodal.encoders.imagebind import ImageBindEncoder

    enc = ImageBindEncoder.from_config({"preset": "tiny"}, ["image", "audio", "video"])
    path = tmp / "imagebind_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("standins")
    return write_vicuna(tmp / "vicuna", TINY), write_delta(tmp / "pytorch_model.pt", TINY), imagebind_file(tmp)


def converted(tmp: Path, standins, vicuna: Path | None = None, **kwargs) -> Path:
    base, delta, imagebind = standins
    out = tmp / "out"
    kwargs = {"imagebind": imagebind, "imagebind_preset": "tiny", "dtype": "float32", "progress": False,
              "log": lambda *_: None, **kwargs}
    convert_nextgpt(delta, vicuna or base, out, **kwargs)
    return out


@pytest.fixture(scope="module")
def processor(tmp_path_factory, standins) -> AnyModalProcessor:
    return AnyModalProcessor.from_pretrained(converted(tmp_path_factory.mktemp("conv"), standins) / "processor")




def tiny_generators(tmp: Path, dtype: str = "float32") -> dict[str, str]:
    """tiny.yaml's SD / AudioLDM / text-to-video, saved as local folders (their shapes fit TINY's delta)."""
    from anymodal.config import AnyModalConfig, GeneratorConfig
    from anymodal.registry import GENERATORS

    tiny = AnyModalConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    out = {}
    for m, g in tiny.generators.items():
        d = tmp / f"gen-{m.value}"
        GENERATORS.get(g.type).from_config(GeneratorConfig(type=g.type, components=g.components,
                                                           dtype=dtype)).save_pretrained(d)
        out[m.value] = str(d)
    return out
