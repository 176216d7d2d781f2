"""docs/architecture.md, "How to add a modality": docs/examples/depth_modality.py adds a "depth"
modality (one ModalitySpec, one encoder, one generator) and every use of the library takes it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anymodal import AnyModalPipeline
from anymodal.config import AnyModalConfig
from anymodal.modality import Modality, ModalitySpec, media_modalities, register_modality, unregister_modality
from conftest import ForceFirst

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "depth_modality.py"


@pytest.fixture(scope="module")
def depth():
    """Import the example (which registers its modality and types), undone afterwards: the registries
    are global and other tests enumerate the built-ins."""
    from anymodal.registry import ENCODERS, GENERATORS

    spec = importlib.util.spec_from_file_location("depth_modality", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["depth_modality"] = module
    spec.loader.exec_module(module)
    yield module
    ENCODERS._entries.pop("depth-grid", None)
    GENERATORS._entries.pop("depth-plane", None)
    unregister_modality("depth")
    sys.modules.pop("depth_modality", None)


def _config() -> AnyModalConfig:
    return AnyModalConfig.from_dict({
        "name": "depth-demo",
        "llm": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 320,
                           "max_position_embeddings": 256},
                "tokenizer": "bytes", "max_new_tokens": 8},
        "encoders": {"depth": {"type": "depth-grid", "modalities": ["depth"], "options": {"dim": 16}}},
        "input_projectors": {"depth": {"type": "linear", "num_tokens": 1}},
        "output_projectors": {"depth": {"hidden_dim": 16, "num_layers": 1, "num_heads": 2}},
        "generators": {"depth": {"type": "depth-plane", "settings": {"size": 6}}},  # as docs/architecture.md writes it
    })


@pytest.fixture(scope="module")
def pipe(depth):
    torch.manual_seed(0)
    return AnyModalPipeline.from_config(_config())


def _force_depth(pipe):
    ids = pipe.processor.signal_ids[Modality("depth")]
    return dict(max_new_tokens=len(ids), logits_processor=[ForceFirst(ids[0])])


def test_the_spec_is_the_one_entry(depth, pipe):
    key = Modality("depth")
    assert key is Modality.DEPTH and key in media_modalities() and key.spec is depth.DEPTH
    assert pipe.processor.signal_strings[key] == ["<dep_0>", "<dep_1>"]  # the spec's prefix and default count
    assert pipe.config.output_projectors[key].targets == {"plane": [1, 3]}  # from the generator
    assert "<depth>" in pipe.processor.tokenizer.get_vocab()
    from anymodal.chat import chat_help

    assert "/depth PATH" in chat_help() and "/image PATH" in chat_help()  # anymodal chat attaches it too


def test_depth_in_and_out_of_the_pipeline(depth, pipe, tmp_path):
    given = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    np.save(tmp_path / "in.npy", given)
    out = pipe("make a depth map of <depth>", depths=[str(tmp_path / "in.npy")], seed=0, **_force_depth(pipe))
    (made,) = out.depths[0]
    assert out.media[Modality.DEPTH] is out.depths and out.media["depth"] is out.depths
    assert made.shape == (6, 6) and made.dtype == np.float32
    assert out.text[0] == "<depth>"
    # a batch: one entry per prompt, as for the built-in media
    batch = pipe(["a", "b"], depths=[given, None], seed=0, **_force_depth(pipe))
    assert [len(x) for x in batch.depths] == [1, 1]

    from anymodal.commands import write_outputs

    written = write_outputs(out, 0, tmp_path / "out")
    assert [Path(p).name for p in written["depth"]] == ["depth_0.npy"]
    np.testing.assert_array_equal(np.load(written["depth"][0]), made)


def test_bad_depth_input_is_refused_by_the_spec(depth, pipe):
    with pytest.raises(ValueError, match="cannot use dict as depth input; expected a .npy file path"):
        pipe("x", depths={"a": 1})
    with pytest.raises(ValueError, match="NaN or infinite"):
        pipe("x", depths=[np.full((4, 4), np.nan, np.float32)])
    with pytest.raises(TypeError, match="unexpected keyword argument 'depthz'.*depths="):
        pipe("x", depthz=[np.zeros((4, 4), np.float32)])


def test_a_chat_session_keeps_depth_maps(depth, pipe, tmp_path):
    from anymodal.session import ChatSession

    chat = ChatSession(pipe, seed=0)
    sent = np.arange(16, dtype=np.float32).reshape(4, 4)
    ids = pipe.processor.signal_ids[Modality.DEPTH]
    pipe_call = pipe.generate

    def forced(convs, **kw):  # the random LLM must emit a depth map
        kw.update(max_new_tokens=len(ids), logits_processor=[ForceFirst(ids[0])])
        return pipe_call(convs, **kw)

    pipe.generate = forced
    try:
        reply = chat.send("a ramp like <depth>", depths=sent)
    finally:
        del pipe.generate
    assert len(reply.depths) == 1 and reply.text == "<depth>"
    chat.save(tmp_path / "session")
    again = ChatSession.load(tmp_path / "session", pipe)
    np.testing.assert_array_equal(again.turns[0].depths[0], sent)
    np.testing.assert_array_equal(again.turns[1].depths[0], reply.depths[0])


def test_a_batch_row_takes_depth_files(depth, pipe, tmp_path):
    from anymodal.batch import read_rows, run_batch

    np.save(tmp_path / "d.npy", np.ones((5, 5), np.float32))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "r1", "prompt": "describe <depth>", "depths": ["d.npy"]}) + "\n"
                    + json.dumps({"id": "r2", "prompt": "x", "depthz": ["d.npy"]}) + "\n")
    results = {r.id: r for r in run_batch(pipe, read_rows(rows), tmp_path / "out", base_dir=tmp_path, progress=False)}
    assert results["r1"].status == "done", results["r1"]
    assert results["r2"].status != "done" and "depths" in results["r2"].error


def test_the_pipeline_saves_and_reloads_with_the_modality(depth, pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    again = AnyModalPipeline.from_pretrained(tmp_path / "saved")
    assert Modality.DEPTH in again.generators and Modality.DEPTH in again.config.input_projectors
    a = pipe("p", seed=0, **_force_depth(pipe)).depths[0][0]
    b = again("p", seed=0, **_force_depth(again)).depths[0][0]
    np.testing.assert_allclose(a, b, atol=1e-5)

    from anymodal import cli

    np.save(tmp_path / "d.npy", np.ones((5, 5), np.float32))  # the CLI takes a registered modality's files too
    assert cli.main(["generate", "describe <depth>", "--model", str(tmp_path / "saved"), "--depth",
                     str(tmp_path / "d.npy"), "--out", str(tmp_path / "cli"), "--max-new-tokens", "4"]) == 0
    assert (tmp_path / "cli" / "text.txt").is_file()


def test_registering_a_clashing_or_malformed_spec_is_refused(depth):
    base = depth.DEPTH
    with pytest.raises(ValueError, match="already registered"):
        register_modality(base)
    import dataclasses

    with pytest.raises(ValueError, match="plural 'images' is already used by modality 'image'"):
        register_modality(dataclasses.replace(base, name="pointcloud", plural="images", signal_prefix="pc"))
    with pytest.raises(ValueError, match="lower-case identifier"):
        dataclasses.replace(base, name="Point Cloud")
    with pytest.raises(ValueError, match="cannot be removed"):
        unregister_modality("image")
    assert isinstance(base, ModalitySpec)


def test_the_three_training_stages_take_depth_data(depth, tmp_path):
    """Caption pairs (stages 1-2) and dialogues (stage 3) name the modality like any built-in; train()
    also takes the config as an object."""
    import math

    from anymodal.training.trainer import train

    (tmp_path / "maps").mkdir()
    pairs, dialogues = [], []
    for i in range(4):
        np.save(tmp_path / "maps" / f"{i}.npy", np.full((6, 6), i / 4, np.float32))
        pairs.append({"modality": "depth", "media": f"maps/{i}.npy", "caption": f"a flat plane at {i}"})
        dialogues.append({"messages": [
            {"role": "user", "content": ["make a plane like", {"depth": f"maps/{i}.npy"}]},
            {"role": "assistant", "content": ["here: ", {"depth": None, "caption": f"a flat plane at {i}"}]}]})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (tmp_path / "dialogues.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dialogues))
    source = _config()
    for stage, data in ((1, "pairs.jsonl"), (2, "pairs.jsonl"), (3, "dialogues.jsonl")):
        result = train(source, tmp_path / data, tmp_path / f"stage{stage}", stage=stage, max_steps=2)
        assert result.bad_rows == 0 and len(result.losses) == 2 and all(map(math.isfinite, result.losses)), stage
        source = result.final_dir
    again = AnyModalPipeline.from_pretrained(source)
    assert again("p", seed=0, **_force_depth(again)).depths[0][0].shape == (6, 6)


def test_the_web_ui_offers_a_generated_depth_map_as_a_download(depth, pipe, tmp_path, monkeypatch):
    """The page shows image, audio and video; another registered modality's reply is written with its
    spec's saver and served as an attachment (application/octet-stream), never rendered."""
    import io

    pytest.importorskip("uvicorn")
    from _uiclient import multipart, new_session, request, serving

    ids = pipe.processor.signal_ids[Modality.DEPTH]
    original = type(pipe).generate

    def forced(self, convs, **kw):  # the random LLM must emit a depth map
        kw.update(max_new_tokens=len(ids), logits_processor=[ForceFirst(ids[0])])
        return original(self, convs, **kw)

    monkeypatch.setattr(type(pipe), "generate", forced)
    for base in serving(pipe, tmp_path / "media"):
        sid = new_session(base)
        body, headers = multipart([("text", None, b"a ramp")])
        r = request(base, "POST", f"/api/sessions/{sid}/send", body, headers)
        assert r.status == 200, r
        (item,) = r.json()["reply"]["media"]
        assert item["kind"] == "depth" and item["url"].endswith(".npy")
        got = request(base, "GET", item["url"])
        assert got.status == 200 and got.headers["content-type"] == "application/octet-stream"
        assert got.headers["content-disposition"].startswith("attachment")
        assert np.load(io.BytesIO(got.body), allow_pickle=False).shape == (6, 6)
