"""save_pretrained keeps the dtype each weight was stored in (issue 21): the shipped default, stored in
float16 and run in float32, saves as float16 again, not as a float32 copy twice its size."""

from __future__ import annotations

import torch

from anymodal import AnyModalPipeline
from anymodal.pipeline import _safetensors_header, default_model_path, stored_dtypes


def _size(directory) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))


def test_saving_the_default_keeps_each_component_dtype(tmp_path):
    shipped = default_model_path()
    pipe = AnyModalPipeline.from_pretrained()
    assert all(p.dtype == torch.float32 for p in pipe.model.parameters())  # runs in float32
    pipe.save_pretrained(tmp_path / "copy")
    copy = tmp_path / "copy"
    assert stored_dtypes(copy) == stored_dtypes(shipped) and stored_dtypes(shipped)  # same tensors, same dtypes
    for f in shipped.rglob("*.safetensors"):  # float32 tensors (the vocoder's mel filterbank) stay float32
        rel = f.relative_to(shipped)
        want = {k: v["dtype"] for k, v in _safetensors_header(f).items() if k != "__metadata__"}
        got = {k: v["dtype"] for k, v in _safetensors_header(copy / rel).items() if k != "__metadata__"}
        assert got == want, rel
    assert _size(copy) <= 1.02 * _size(shipped)
    # and the copy loads and runs as the original does
    again = AnyModalPipeline.from_pretrained(copy)
    for a, b in zip(pipe.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_a_pipeline_built_in_memory_saves_in_its_own_dtype(tmp_path):
    pipe = AnyModalPipeline.from_pretrained("tiny")
    pipe.save_pretrained(tmp_path / "t")
    assert stored_dtypes(tmp_path / "t") == {}  # all float32, as built
