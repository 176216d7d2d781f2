"""Shared fixtures: tiny real components, built the way diffusers and transformers test."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # the CI machine's 2 cores are shared; more threads make tiny models slower

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def pytest_collection_modifyitems(config, items) -> None:
    """``real_weights`` tests run only when asked for (``-m real_weights``, on a machine that has the
    checkpoints); a plain ``pytest`` skips them, saying how to run them."""
    if "real_weights" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="needs real pretrained weights on disk: run with -m real_weights where they are")
    for item in items:
        if "real_weights" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return CONFIGS / "tiny.yaml"


def teach(pipe, examples: list[tuple[str, str]], steps: int = 150, lr: float = 1e-2) -> None:
    """Overfit the tiny LLM on (prompt, response) pairs so that it emits known text and signal tokens.

    Random weights never emit a signal token; this makes the generation path testable
    through the model's real forward pass and loss.
    """
    from anymodal.processor import Message

    proc, model = pipe.processor, pipe.model
    tok = proc.tokenizer
    texts, prompt_lens = [], []
    for prompt, response in examples:
        head = proc.format([Message("user", prompt)])
        texts.append(head + response + tok.eos_token)
        prompt_lens.append(len(tok(head, add_special_tokens=False)["input_ids"]))
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].clone()
    for i, n in enumerate(prompt_lens):
        pad = int((enc["attention_mask"][i] == 0).sum())  # left padding
        labels[i, : pad + n] = -100
    lm = model.language_model
    lm.train()
    opt = torch.optim.Adam(lm.parameters(), lr=lr)
    torch.manual_seed(0)
    with torch.enable_grad():
        for _ in range(steps):
            out = model(enc["input_ids"], enc["attention_mask"], labels=labels)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    lm.eval()


def close_to_scale(x, y, rel: float = 1e-4) -> bool:
    """Same shape and equal to within ``rel`` of ``x``'s largest magnitude: float rounding, as when
    reloaded weights (bit-identical) sit at other addresses and an AVX2 kernel sums in another
    order. Exact on some CPUs, not on every one."""
    x, y = np.asarray(x), np.asarray(y)
    return x.shape == y.shape and float(np.abs(x - y).max()) <= rel * max(float(np.abs(x).max()), 1e-30)


class ForceFirst:
    """A logits processor that forces the first generated token (a signal token), so that a random
    LLM emits a medium; anymodal forces the rest of the block itself."""

    def __init__(self, token_id: int):
        self.token_id, self.start = token_id, None

    def __call__(self, input_ids, scores):
        import torch

        if self.start is None:
            self.start = input_ids.shape[1]
        if input_ids.shape[1] == self.start:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token_id] = 0.0
        return scores
