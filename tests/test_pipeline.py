"""The five components end to end on tiny real components (configs/tiny.yaml)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from anymodal import Audio, AnyModalConfig, AnyModalPipeline, ImageSettings, MediaError, Modality
from anymodal.cli import main as cli_main
from anymodal.generation import SignalSpanForcing
from conftest import CONFIGS, close_to_scale, teach

I, A, V = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


def block(prefix: str, n: int) -> str:
    return "".join(f"<{prefix}_{i}>" for i in range(n))


EXAMPLES = [
    ("draw", "ok " + block("img", 4)),
    ("play", block("aud", 8)),
    ("film", block("vid", 24)),
    ("both", "a " + block("img", 4) + " b " + block("aud", 8)),
    ("part", "<img_0>xyz"),  # only the first signal token is taught: forcing must finish the block
    ("hello", "hi there"),
]


@pytest.fixture(scope="module")
def pipe() -> AnyModalPipeline:
    torch.manual_seed(0)
    p = AnyModalPipeline.from_pretrained(CONFIGS / "tiny.yaml")
    teach(p, EXAMPLES)
    return p


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / "a.png")
    t = np.arange(44100) / 44100
    sf.write(d / "tone.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 44100)
    (d / "broken.png").write_bytes(b"this is not a png")
    (d / "notes.wav").write_text("not audio at all")
    return d


def _arr(x) -> np.ndarray:
    return np.asarray(x.array if isinstance(x, Audio) else x, dtype=np.float32)


# ---------------------------------------------------------------- text -> X
def test_text_to_text(pipe):
    out = pipe("hello", seed=0)
    assert out.text == ["hi there"] and out.images == [[]] and out.audios == [[]] and out.videos == [[]]


def test_text_to_image(pipe):
    out = pipe("draw", seed=0)
    assert out.text == ["ok <image>"]
    (img,) = out.images[0]
    assert isinstance(img, Image.Image) and img.size == (16, 16)


def test_text_to_audio(pipe):
    out = pipe("play", seed=0)
    assert out.text == ["<audio>"]
    (aud,) = out.audios[0]
    assert isinstance(aud, Audio) and aud.sample_rate == 16000 and aud.array.dtype == np.float32
    assert abs(aud.duration - 0.064) < 0.02


def test_text_to_video(pipe):
    out = pipe("film", seed=0)
    (video,) = out.videos[0]
    assert len(video) == 4 and all(isinstance(f, Image.Image) for f in video)


def test_two_media_in_one_reply(pipe):
    out = pipe("both", seed=0)
    assert out.text == ["a <image> b <audio>"]
    assert len(out.images[0]) == 1 and len(out.audios[0]) == 1


def test_settings_reach_the_generator(pipe):
    out = pipe("draw", seed=0, settings={"image": ImageSettings(num_inference_steps=1, height=32, width=32)})
    assert out.images[0][0].size == (32, 32)
    out = pipe("draw", seed=0, settings=[ImageSettings(num_inference_steps=1, height=24, width=24)])
    assert out.images[0][0].size == (24, 24)
    with pytest.raises(ValueError, match="allowed fields"):
        pipe("draw", settings={"image": {"colour": "red"}})


def test_settings_are_resolved_once(pipe, monkeypatch):
    # resolve_settings merges the config's defaults with the call's overrides; the generator then
    # takes the resolved object as it is
    gen = pipe.generators[I]
    calls = []
    original = gen.make_settings
    monkeypatch.setattr(gen, "make_settings", lambda settings=None: calls.append(settings) or original(settings))
    overrides = {"num_inference_steps": 1, "height": 24, "width": 32}
    out = pipe("draw", seed=0, settings={"image": overrides})
    assert calls == [overrides] and out.images[0][0].size == (32, 24)


# ---------------------------------------------------------------- X -> text
def test_image_to_text(pipe, media_files):
    path = media_files / "a.png"
    outs = [pipe("what is in <image>?", images=[image], seed=0)
            for image in (str(path), Image.open(path), np.asarray(Image.open(path)))]
    # a file, a PIL image and an array of the same picture are the same input: the same reply
    assert outs[0].token_ids[0] and all(o.token_ids == outs[0].token_ids and o.text == outs[0].text for o in outs)
    assert outs[0].text[0] == pipe.processor.split_output(outs[0].token_ids[0])[0]
    # the image really enters the sequence: different images, different first-step logits
    a = _first_logits(pipe, "what?", images=[str(path)])
    b = _first_logits(pipe, "what?", images=[np.zeros((32, 32, 3), np.uint8)])
    assert not torch.allclose(a, b)


def test_audio_and_video_to_text(pipe, media_files):
    tone = media_files / "tone.wav"
    wave, rate = sf.read(tone, dtype="float32")
    from_file = pipe("what sound?", audios=[str(tone)], seed=0)
    from_array = pipe("what sound?", audios=[(wave, rate)], seed=0)
    assert from_file.token_ids[0] and from_file.token_ids == from_array.token_ids  # the same clip, either way
    a = _first_logits(pipe, "what sound?", audios=[str(tone)])
    b = _first_logits(pipe, "what sound?", audios=[(np.zeros(8000, np.float32), 8000)])
    assert not torch.allclose(a, b)  # the sound enters the sequence
    frames = [Image.new("RGB", (32, 32), (i * 30, 0, 0)) for i in range(4)]
    as_list = pipe("what moves in <video>?", videos=[frames], seed=0)
    as_array = pipe("what moves in <video>?", videos=[np.stack([np.asarray(f) for f in frames])], seed=0)
    assert as_list.token_ids[0] and as_list.token_ids == as_array.token_ids
    still = [Image.new("RGB", (32, 32), (0, 90, 0))] * 4
    assert not torch.allclose(_first_logits(pipe, "what moves?", videos=[frames]),
                              _first_logits(pipe, "what moves?", videos=[still]))


def _first_logits(pipe, prompt, **media):
    from anymodal.processor import Message

    rows = {Modality.parse(k[:-1]): v for k, v in media.items()}
    text = pipe.processor.format([Message("user", pipe.processor.place_media(prompt, {m: len(v) for m, v in rows.items()}))])
    batch = pipe.processor([text])
    feats = {m: pipe.model.encode_media(m, pipe.model.encoder_for(m).preprocess(m, v)) for m, v in rows.items()}
    with torch.no_grad():
        return pipe.model(batch["input_ids"], batch["attention_mask"], media=feats).logits[0, -1]


def test_features_fill_exactly_the_placeholder_positions(pipe):
    proc, model = pipe.processor, pipe.model
    ids = proc(["x <audio> y"])["input_ids"]  # the processor expands the placeholder to 2 positions
    feats = torch.randn(1, 2, model.llm_config.hidden_size)
    embeds = model.embed(ids, {A: feats})
    pos = (ids[0] == proc.placeholder_ids[A]).nonzero().flatten()
    assert torch.equal(embeds[0, pos], feats[0])
    with pytest.raises(ValueError, match=r"audio: the prompt has 2 placeholder positions \(1 audio\(s\) x 2\) but 2 audio\(s\)"):
        model.embed(ids, {A: torch.randn(2, 2, model.llm_config.hidden_size)})


# ---------------------------------------------------------------- batches and forcing
def test_batch_of_three(pipe):
    out = pipe(["draw", "play", "hello"], seed=0)
    assert out.text == ["ok <image>", "<audio>", "hi there"]
    assert [len(x) for x in out.images] == [1, 0, 0] and [len(x) for x in out.audios] == [0, 1, 0]
    alone = pipe("draw", seed=0)
    # a prompt gives the same image alone or in a batch (to float rounding in the batched UNet)
    assert np.abs(np.asarray(alone.images[0][0], np.int16) - np.asarray(out.images[0][0], np.int16)).max() <= 2


def test_batch_with_media_per_prompt(pipe, media_files):
    out = pipe(["what is <image>?", "hello", "and <image>?"], images=[str(media_files / "a.png"), None,
                                                                       [np.zeros((8, 8, 3), np.uint8)]], seed=0)
    assert len(out.text) == 3
    with pytest.raises(ValueError, match="one entry .* per prompt"):
        pipe(["a", "b"], images=[str(media_files / "a.png")])


def test_generators_are_called_once_per_batch(pipe, monkeypatch):
    gen = pipe.generators[I]
    calls = []
    original = gen.render

    def spy(conditioning, *a, **k):
        calls.append(conditioning["prompt_embeds"].shape[0])
        return original(conditioning, *a, **k)

    monkeypatch.setattr(gen, "render", spy)
    out = pipe(["draw", "draw", "both"], seed=0)
    assert calls == [3] and [len(x) for x in out.images] == [1, 1, 1]


def test_forced_signal_span(pipe):
    out = pipe("part", seed=0)
    assert out.text[0].startswith("<image>") and len(out.images[0]) == 1
    ids = pipe.processor.signal_ids[I]
    assert out.token_ids[0][:4] == ids
    # without forcing the model would not have finished the block itself
    raw = _generate_raw(pipe, "part", forcing=False)
    assert raw[0] == ids[0] and raw[1] != ids[1]


def test_no_partial_block_when_budget_is_short(pipe):
    out = pipe("film", max_new_tokens=10, seed=0)  # a video block needs 24 tokens
    assert out.videos == [[]] and "<vid_" not in out.text[0]
    assert not set(out.token_ids[0]) & set(pipe.processor.signal_ids[V])


def _generate_raw(pipe, prompt, forcing: bool):
    from anymodal.processor import Message

    proc = pipe.processor
    batch = proc([proc.format([Message("user", prompt)])])
    embeds = pipe.model.embed(batch["input_ids"])
    extra = [SignalSpanForcing(proc.signal_ids, 8)] if forcing else []
    with torch.no_grad():
        out = pipe.model.language_model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                                 max_new_tokens=8, do_sample=False, logits_processor=extra,
                                                 pad_token_id=proc.tokenizer.pad_token_id)
    return out[0].tolist()


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip_gives_identical_outputs(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = ["draw", "play", "film"]
    before = pipe(prompts, seed=7)
    pipe.save_pretrained(tmp_path / "saved")
    files = [p.name for p in (tmp_path / "saved").rglob("*") if p.is_file()]
    assert "anymodal_index.json" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    for sub in ("processor", "llm", "encoders/imagebind", "input_projectors", "output_projectors",
                "generators/image", "generators/audio", "generators/video"):
        assert (tmp_path / "saved" / sub).exists(), sub
    again = AnyModalPipeline.from_pretrained(tmp_path / "saved")
    after = again(prompts, seed=7)
    assert after.text == before.text and after.token_ids == before.token_ids
    for m in (I, A, V):
        for x, y in zip(before.media[m], after.media[m]):
            assert len(x) == len(y)
            for a, b in zip(x, y):
                if m is V:
                    assert all(np.array_equal(np.asarray(f), np.asarray(g)) for f, g in zip(a, b))
                elif m is A:  # float samples: equal up to rounding (exact on some CPUs, not on every one)
                    assert close_to_scale(_arr(a), _arr(b))
                else:
                    assert np.array_equal(_arr(a), _arr(b))


def _buildable_offline(name: str) -> str | None:
    """Why a shipped config cannot be built here at tiny size, or None."""
    from anymodal.pipeline import shipped_config

    cfg = AnyModalConfig.from_yaml(shipped_config(name))
    if cfg.llm.model is not None or any(e.pretrained for e in cfg.encoders.values()) \
            or any(g.pretrained for g in cfg.generators.values()):
        return "needs downloaded weights"
    if (cfg.llm.config or {}).get("hidden_size", 0) > 1024:
        return "real-size random weights (a GPU benchmark)"
    return None


def _shipped_config_cases() -> list:
    """Every shipped config: those that need downloaded weights are marked ``real_weights`` (CI
    deselects them; ``pytest -m real_weights`` runs them where the weights are in the local cache),
    the real-size random one also ``gpu``."""
    from anymodal.pipeline import list_configs

    cases = []
    for name in list_configs():
        reason = _buildable_offline(name)
        if reason is None:
            cases.append(name)
        elif "GPU" in reason:
            cases.append(pytest.param(name, marks=[pytest.mark.real_weights, pytest.mark.gpu, pytest.mark.skipif(
                not torch.cuda.is_available(), reason=f"{name}: {reason}, needs a CUDA GPU")]))
        else:
            cases.append(pytest.param(name, marks=pytest.mark.real_weights))
    return cases


@pytest.mark.parametrize("name", _shipped_config_cases())
def test_shipped_configs_survive_save_and_reload_elsewhere(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    device = "cuda" if "GPU" in (_buildable_offline(name) or "") else None
    built = AnyModalPipeline.from_pretrained(name, device=device)
    prompts = ["draw", "play a tone"]
    before = built(prompts, seed=3, max_new_tokens=6)
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    built.save_pretrained("saved")
    monkeypatch.chdir(tmp_path)
    again = AnyModalPipeline.from_pretrained(tmp_path / "a" / "saved", device=device)
    after = again(prompts, seed=3, max_new_tokens=6)
    assert after.text == before.text and after.token_ids == before.token_ids


def test_loading_a_small_saved_model_is_quiet_and_restores_settings(pipe, tmp_path, monkeypatch, capfd):
    """No loading bars for a small local model, no notices about the deprecated diffusers pipelines
    anymodal wraps on purpose; the caller's progress-bar settings are as they were."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.save_pretrained(tmp_path / "saved")
    before = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.enable_progress_bar()  # the caller's setting: bars on
    tlog.enable_progress_bar()
    try:
        capfd.readouterr()
        again = AnyModalPipeline.from_pretrained(tmp_path / "saved")
        for m in (I, A, V):
            assert again.generators[m].pipeline is not None  # generators load lazily: force it
        err = capfd.readouterr().err
        assert "Loading" not in err and "deprecated" not in err, err
        assert dlog.is_progress_bar_enabled() and tlog.is_progress_bar_enabled()
    finally:
        (dlog.enable_progress_bar if before[0] else dlog.disable_progress_bar)()
        (tlog.enable_progress_bar if before[1] else tlog.disable_progress_bar)()
    import logging

    source = logging.getLogger("diffusers.pipelines.pipeline_utils")
    assert not any(type(f).__name__ == "_DropHarmless" for f in source.filters)


def test_lora_wrapping_is_quiet_and_leaves_warning_filters_alone():
    """peft's own ``is_gradient_checkpointing`` lookup makes transformers warn; that notice is not the
    user's to act on, so wrapping hides it, and only it."""
    import warnings

    cfg = AnyModalConfig.from_yaml(CONFIGS / "tiny.yaml").to_dict()
    cfg["llm"]["lora"] = {"r": 2}
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = AnyModalPipeline.from_config(AnyModalConfig.from_dict(cfg))
        warnings.warn("is_gradient_checkpointing elsewhere", FutureWarning)  # outside the wrapping: kept
    assert type(lora.model.language_model).__name__.startswith("Peft")
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == [
        "is_gradient_checkpointing elsewhere"]
    assert warnings.filters == filters


def test_output_projector_shape_mismatch_raises_at_load():
    cfg = AnyModalConfig.from_yaml(CONFIGS / "tiny.yaml").to_dict()
    cfg["output_projectors"]["image"]["targets"] = {"prompt_embeds": [77, 768]}
    with pytest.raises(ValueError, match=r"output_projectors\[image\]\.targets .* do not match .* \(16, 32\)"):
        AnyModalPipeline.from_config(AnyModalConfig.from_dict(cfg))


def test_generator_type_must_fit_its_modality():
    cfg = AnyModalConfig.from_yaml(CONFIGS / "tiny.yaml").to_dict()
    cfg["generators"]["image"]["type"] = "audioldm"
    with pytest.raises(ValueError, match=r"generators\.image\.type: the .audioldm. generator makes audio, not image"):
        AnyModalPipeline.from_config(AnyModalConfig.from_dict(cfg))


# ---------------------------------------------------------------- bad input
def test_bad_media_get_specific_errors(pipe, media_files):
    with pytest.raises(MediaError, match="broken.png"):
        pipe("what?", images=[str(media_files / "broken.png")])
    with pytest.raises(MediaError, match="notes.wav"):
        pipe("what?", audios=[str(media_files / "notes.wav")])
    with pytest.raises(MediaError, match="missing.png"):
        pipe("what?", images=[str(media_files / "missing.png")])
    with pytest.raises(MediaError, match="cannot use dict as image input"):
        pipe("what?", images=[{"path": "x"}])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        pipe("compare <image>", images=[str(media_files / "a.png")] * 2)


def test_bad_prompts(pipe):
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe("")
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        pipe("draw", settings={"smell": {}})


# ---------------------------------------------------------------- CLI
def test_cli_generate_writes_files(pipe, tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "m")
    out_dir = tmp_path / "out"
    (out_dir).mkdir()
    (out_dir / "image_0.png").write_bytes(b"the user's own file")
    assert cli_main(["generate", "both", "--model", str(tmp_path / "m"), "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "image: " in printed and "audio: " in printed
    assert (out_dir / "image_0.png").read_bytes() == b"the user's own file"  # never clobbered
    assert Image.open(out_dir / "image_0-1.png").size == (16, 16)
    data, sr = sf.read(out_dir / "audio_0.wav", dtype="float32")
    expected = pipe("both", seed=0).audios[0][0]  # the CLI's default seed
    assert sr == expected.sample_rate == 16000 and data.shape == expected.array.shape
    # the samples themselves, within one 16-bit PCM step (test_what_users_see checks a loud clip)
    np.testing.assert_allclose(data, expected.array, atol=1 / 32767 + 1e-7, rtol=0)
    assert (out_dir / "text.txt").read_text().strip() == "a <image> b <audio>"


def test_cli_reports_bad_input(tmp_path, capsys):
    assert cli_main(["generate", "", "--config", "tiny", "--out", str(tmp_path)]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert cli_main(["generate", "hi", "--config", "nope", "--out", str(tmp_path)]) == 2
    assert "shipped config name" in capsys.readouterr().err


def test_signal_states_caught_during_generation_match_a_full_pass(pipe):
    """The hook on the LM head's input gives the same states as a separate forward pass."""
    from anymodal.generation import _gather, _signal_states, generate_text
    from anymodal.processor import Message

    proc = pipe.processor
    batch = proc([proc.format([Message("user", p)]) for p in ("both", "draw", "hello")])
    with torch.no_grad():
        result = generate_text(pipe.model, proc, batch["input_ids"], batch["attention_mask"], {}, 40)
        embeds = pipe.model.embed(batch["input_ids"])
        last = pipe.model.llm_config.num_hidden_layers
        full = _gather(_signal_states(pipe.model, embeds, batch["attention_mask"], result.sequences, proc, [last]),
                       result.spans, proc, lambda m: last)
    assert set(result.signal_hidden) == {I, A}
    for m in full:
        assert torch.allclose(result.signal_hidden[m], full[m], atol=1e-4)
    # a block that ends exactly at the token budget falls back to the full pass
    with torch.no_grad():
        short = generate_text(pipe.model, proc, batch["input_ids"][1:2], batch["attention_mask"][1:2], {}, 7)
    assert short.sequences[0][-4:] == proc.signal_ids[I] and short.signal_hidden[I].shape[:2] == (1, 4)


def test_an_output_projector_reads_the_hidden_layer_it_is_configured_for(pipe, monkeypatch):
    """hidden_layer (NExT-GPT's text_emb_to_<m>_layers): the image block's states come from
    transformers' hidden_states[1], the audio block's from the last layer, both while generating
    (a hook on the decoder layer) and in the fallback full pass, as a plain forward pass gives them."""
    from anymodal.generation import generate_text
    from anymodal.processor import Message

    monkeypatch.setitem(pipe.model.signal_layers, I, 1)
    proc, lm = pipe.processor, pipe.model.language_model
    batch = proc([proc.format([Message("user", "both")])])
    for budget in (40, 17):  # 17: the audio block ends the budget, so the states come from one full pass
        with torch.no_grad():
            result = generate_text(pipe.model, proc, batch["input_ids"], batch["attention_mask"], {}, budget)
            seq = torch.tensor([result.sequences[0]])
            ids = torch.cat([batch["input_ids"], seq], 1)
            ref = lm(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
        n = batch["input_ids"].shape[1]
        (m1, s1), (m2, s2) = result.spans[0]
        assert (m1, m2) == (I, A)
        assert torch.allclose(result.signal_hidden[I][0], ref[1][0, n + s1: n + s1 + 4], atol=1e-4)
        assert not torch.allclose(result.signal_hidden[I][0], ref[-1][0, n + s1: n + s1 + 4], atol=1e-2)
        assert torch.allclose(result.signal_hidden[A][0], ref[-1][0, n + s2: n + s2 + 8], atol=1e-4)


def test_hidden_layer_is_checked_against_the_llm():
    cfg = AnyModalConfig.from_yaml(CONFIGS / "tiny.yaml")
    with pytest.raises(ValueError, match="hidden_layer must be a non-zero integer"):
        type(cfg.output_projectors[I])(hidden_layer=0)
    cfg.output_projectors[I].hidden_layer = 99
    with pytest.raises(ValueError, match=r"hidden_layer is 99, but the LLM has \d+ decoder layers"):
        AnyModalPipeline.from_config(cfg)
