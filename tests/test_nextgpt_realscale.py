"""What a real-size NExT-GPT conversion needs beyond the parity tests: the converter's flags, its
checks of the ImageBind file, memory-minded writing of the embedding rows, and the load path
(rows read in slices, no random init of rows that are loaded anyway, generators when needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _nextgpt_standins import TINY, converted, imagebind_file, standins  # noqa: F401
from anymodal.cli import main as cli_main
from anymodal.config import AnyModalConfig
from anymodal.convert.nextgpt import ConversionError


def test_lora_alpha_flag(tmp_path, standins, capsys):
    base, delta, ib = standins
    out = tmp_path / "out"
    rc = cli_main(["convert", "nextgpt", str(delta), "--llm", str(base), "--out", str(out), "--imagebind", str(ib),
                   "--imagebind-preset", "tiny", "--lora-alpha", "16", "--no-progress"])
    assert rc == 0
    assert AnyModalConfig.from_yaml(out / "config.yaml").llm.lora.alpha == 16
    assert json.loads((out / "llm_adapter" / "adapter_config.json").read_text())["lora_alpha"] == 16


def test_imagebind_of_another_width_is_refused_at_convert(tmp_path, standins):
    with pytest.raises(ConversionError, match="huge gives 1024-d embeddings.*takes 32-d"):
        converted(tmp_path, standins, imagebind_preset="huge")
    assert not (tmp_path / "out").exists()


def test_imagebind_file_that_does_not_fit_the_preset_is_refused_at_convert(tmp_path, standins):
    from safetensors import safe_open
    from safetensors.torch import save_file

    ib = imagebind_file(tmp_path)
    with safe_open(str(ib), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    key = "modality_heads.vision.2.weight"  # a vision head of another width
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ConversionError, match=f"--imagebind {bad}.*{key}"):
        converted(tmp_path, standins, imagebind=bad)
    assert not (tmp_path / "out").exists()
