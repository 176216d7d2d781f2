"""Every shipped config parses and validates; bad configs fail with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anymodal.config import AnyModalConfig
from anymodal.modality import Modality
from anymodal.registry import (list_encoders, list_generators, list_input_projectors, list_output_projectors,
                               INPUT_PROJECTORS, GENERATORS)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

# What the real checkpoints take, from their published configs: SD-1.5's CLIP ViT-L/14 text
# encoder (77 x 768), AudioLDM's CLAP text embedding (512), Zeroscope's OpenCLIP ViT-H text
# encoder (77 x 1024).
REAL_GENERATOR_TARGETS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {"prompt_embeds": [77, 768]},
    "cvssp/audioldm-l-full": {"prompt_embeds": [1, 512]},
    "cerspense/zeroscope_v2_576w": {"prompt_embeds": [77, 1024]},
}
# vicuna-7b-v0: a local directory (v0 ships only as a delta over LLaMA-7B), as NExT-GPT's release needs.
REAL_LLMS = {"vicuna-7b-v0", "lmsys/vicuna-7b-v1.5", "Qwen/Qwen2.5-7B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"}


def test_configs_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "nextgpt-7b", "nextgpt-qwen2-7b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses_and_round_trips(path: Path):
    cfg = AnyModalConfig.from_yaml(path)
    again = AnyModalConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    for enc in cfg.encoders.values():
        assert enc.type in list_encoders()
    for p in cfg.input_projectors.values():
        assert p.type in list_input_projectors()
    for p in cfg.output_projectors.values():
        assert p.type in list_output_projectors()
    for m, g in cfg.generators.items():
        assert GENERATORS.get(g.type).modality is m


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith("nextgpt")], ids=lambda p: p.stem)
def test_real_configs_match_the_checkpoints(path: Path):
    cfg = AnyModalConfig.from_yaml(path)
    assert cfg.llm.model in REAL_LLMS
    assert cfg.llm.signal_tokens == {Modality.IMAGE: 4, Modality.AUDIO: 8, Modality.VIDEO: 24}
    for m, g in cfg.generators.items():
        assert cfg.output_projectors[m].targets == REAL_GENERATOR_TARGETS[g.pretrained], m
    ib = cfg.encoders["imagebind"]
    assert ib.options == {"preset": "huge", "audio_logit_scale": False}
    assert set(ib.modalities) == {Modality.IMAGE, Modality.AUDIO, Modality.VIDEO}


def test_backbone_swaps_by_config_alone():
    a = AnyModalConfig.from_yaml(next(p for p in CONFIGS if p.stem == "nextgpt-7b-v15")).to_dict()
    b = AnyModalConfig.from_yaml(next(p for p in CONFIGS if p.stem == "nextgpt-qwen2-7b")).to_dict()
    a.pop("name"), b.pop("name")
    assert a["llm"].pop("model") != b["llm"].pop("model")
    assert a == b


def test_recommended_variant_differs_from_the_release_only_in_the_llm():
    a = AnyModalConfig.from_yaml(next(p for p in CONFIGS if p.stem == "nextgpt-7b")).to_dict()
    b = AnyModalConfig.from_yaml(next(p for p in CONFIGS if p.stem == "nextgpt-7b-v15")).to_dict()
    for c in (a, b):
        c.pop("name"), c.pop("llm")
    assert a == b


def _base() -> dict:
    return {"llm": {"config": {"model_type": "llama"}, "tokenizer": "bytes"}}


@pytest.mark.parametrize("patch, message", [
    ({"llm": {"config": {"model_type": "llama"}, "tokenizer": "bytes", "hiden_size": 3}}, "unknown field 'hiden_size' in config.llm"),
    ({"colour": 1}, "unknown field 'colour' in config"),
    ({"llm": {"model": "x", "config": {"model_type": "llama"}}}, "exactly one of llm.model"),
    ({"llm": {"config": {"model_type": "llama"}, "tokenizer": "bytes", "dtype": "float8"}}, "llm.dtype"),
    ({"llm": {"config": {"model_type": "llama"}, "tokenizer": "bytes", "lora": {"dropout": float("nan")}}},
     "config.llm.lora.dropout must be a finite number"),
    ({"llm": {"config": {"model_type": "llama"}, "tokenizer": "bytes", "max_new_tokens": "many"}}, "config.llm.max_new_tokens must be int"),
    ({"llm": {"config": {"model_type": "llama"}, "tokenizer": "bytes", "signal_tokens": {"smell": 4}}}, "unknown modality 'smell'"),
    ({"input_projectors": {"image": {"type": "linear"}}}, "input_projectors[image] has no encoder"),
    ({"input_projectors": {"image": {"num_tokens": 0}}}, "input_projector.num_tokens must be a positive integer"),
    ({"output_projectors": {"image": {"targets": {"prompt_embeds": [77]}}}}, "[sequence_length, dim]"),
    ({"generators": {"image": {"type": "stable-diffusion", "pretrained": "x"}}}, "generators[image] needs output_projectors[image]"),
    ({"encoders": {"a": {"modalities": ["image"]}, "b": {"modalities": ["image"]}}}, "served by both 'a' and 'b'"),
    ({"encoders": {"a": {"modalities": ["text"]}}}, "'text' is not a media modality"),
])
def test_bad_configs_name_the_problem(patch, message):
    data = _base() | patch
    with pytest.raises(ValueError) as e:
        AnyModalConfig.from_dict(data)
    assert message in str(e.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("llm: {config: {model_type: llama}, tokenizer: bytes, dtype: int3}\n")
    with pytest.raises(ValueError, match=r"c\.yaml: llm\.dtype"):
        AnyModalConfig.from_yaml(p)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        AnyModalConfig.from_yaml(tmp_path / "missing.yaml")


def test_unknown_component_type_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown input projector type 'conv'; registered: linear, mlp, qformer"):
        list_input_projectors()
        INPUT_PROJECTORS.get("conv")


def test_unknown_modality():
    with pytest.raises(ValueError, match="unknown modality 'smell'; expected one of: text, image, audio, video"):
        Modality.parse("smell")
