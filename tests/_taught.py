"""A tiny full pipeline (LLM, ImageBind, image/audio/video generators) taught to emit known replies.

Shared by the batch, session and UI tests. Building it takes a few seconds on one CPU thread.
"""

from __future__ import annotations

import torch

from conftest import CONFIGS, teach

IMG = "".join(f"<img_{i}>" for i in range(4))
AUD = "".join(f"<aud_{i}>" for i in range(8))

# prompt -> reply; the replies mark generated media with signal tokens
EXAMPLES = [
    ("draw a cat", f"a cat {IMG}"),
    ("play a tone", f"a tone {AUD}"),
    ("show and play", f"both {IMG} and {AUD}"),
    ("hello", "hi there"),
]


def taught_pipeline(examples: list[tuple[str, str]] = EXAMPLES):
    from anymodal import AnyModalConfig, AnyModalPipeline

    torch.manual_seed(0)
    pipe = AnyModalPipeline.from_config(AnyModalConfig.from_yaml(CONFIGS / "tiny.yaml"))
    if not {"image", "audio"} <= {m.value for m in pipe.generators}:
        raise RuntimeError("configs/tiny.yaml must have image and audio generators for these tests")
    teach(pipe, examples, steps=150, lr=1e-2)
    return pipe


