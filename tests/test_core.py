"""The processor, projectors and signal-span forcing, and a text-only pipeline end to end."""

from __future__ import annotations

import pytest
import torch

from anymodal import config as C
from anymodal.generation import SignalSpanForcing
from anymodal.modality import Modality
from anymodal.processor import AnyModalProcessor, Message
from anymodal.projectors import build_input_projector, build_output_projector
from anymodal.registry import INPUT_PROJECTORS, list_input_projectors, list_output_projectors
from anymodal.tokenization import byte_level_tokenizer

I, A, V = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO

TEXT_ONLY = {"name": "text-only", "llm": {
    "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
               "max_position_embeddings": 256},
    "tokenizer": "bytes", "max_new_tokens": 8}}


@pytest.fixture
def processor() -> AnyModalProcessor:
    return AnyModalProcessor(byte_level_tokenizer(), {I: 4, A: 2}, {I: 3, A: 1})


# ---------------------------------------------------------------- processor
def test_processor_adds_distinct_tokens(processor):
    ids = processor.new_token_ids
    assert len(ids) == len(set(ids)) == 3 + 4 + 2
    assert processor.tokenizer.convert_ids_to_tokens(processor.signal_ids[I]) == ["<img_0>", "<img_1>", "<img_2>", "<img_3>"]
    assert processor.tokenizer.padding_side == "left"


def test_placeholders_expand_to_media_positions(processor):
    text = processor.format([Message("user", processor.place_media("compare <image> and <image>", {I: 2}))])
    ids = processor([text])["input_ids"][0]
    assert int((ids == processor.placeholder_ids[I]).sum()) == 2 * 3


def test_media_without_placeholders_go_first(processor):
    assert processor.place_media("what is it?", {I: 1, A: 1}).startswith("<image><audio>\n")


def test_placeholder_count_mismatch_raises(processor):
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)"):
        processor.place_media("<image> vs <image>", {I: 1})


def test_typed_signal_tokens_never_become_signal_ids(processor):
    """A user typing ``<img_0>`` gets text, not the model's signal token (which would start an image)."""
    signal = {i for ids in processor.signal_ids.values() for i in ids}
    placed = processor.place_media("copy this: <img_0><img_1> and <aud_0>", {})
    ids = set(processor([processor.format([Message("user", placed)])])["input_ids"][0].tolist())
    assert not ids & signal
    assert processor.place_media(placed, {}) == placed  # escaping twice changes nothing


def test_split_output_marks_media_and_keeps_text(processor):
    tok = processor.tokenizer
    ids = tok("look: ")["input_ids"] + processor.signal_ids[I] + tok(" and ")["input_ids"] + processor.signal_ids[A]
    text, spans = processor.split_output(ids)
    assert text == "look: <image> and <audio>"
    assert [m for m, _ in spans] == [I, A]
    # a partial block is not a medium
    text, spans = processor.split_output(processor.signal_ids[I][:2])
    assert spans == [] and "<image>" not in text


def test_prompt_over_context_limit_raises():
    proc = AnyModalProcessor(byte_level_tokenizer(), {}, {}, max_length=10)
    with pytest.raises(ValueError, match="the model's limit is 10"):
        proc(["x" * 50])


# ---------------------------------------------------------------- projectors
@pytest.mark.parametrize("kind", ["linear", "mlp", "qformer"])
@pytest.mark.parametrize("in_tokens", [1, 5])
def test_every_input_projector_builds_and_maps(kind, in_tokens):
    cfg = C.InputProjectorConfig(type=kind, num_tokens=in_tokens if kind != "qformer" else 3, hidden_dim=16,
                                 num_heads=2, num_layers=2)
    proj = build_input_projector(cfg, in_tokens, 12, 24)
    out = proj(torch.randn(2, in_tokens, 12))
    assert out.shape == (2, cfg.num_tokens, 24)
    with pytest.raises(ValueError, match=r"expects features of shape \(batch, %d, 12\)" % in_tokens):
        proj(torch.randn(2, in_tokens, 13))


def test_pooled_feature_expands_to_several_tokens():
    proj = build_input_projector(C.InputProjectorConfig(type="linear", num_tokens=4), 1, 12, 24)
    assert proj(torch.randn(3, 1, 12)).shape == (3, 4, 24)
    with pytest.raises(ValueError, match="cannot map 5 feature tokens to num_tokens=4"):
        build_input_projector(C.InputProjectorConfig(type="linear", num_tokens=4), 5, 12, 24)


def test_registries_are_complete():
    assert list_input_projectors() == ["linear", "mlp", "qformer"]
    assert "transformer" in list_output_projectors()


def test_output_projector_shapes_and_errors():
    cfg = C.OutputProjectorConfig(targets={"prompt_embeds": [7, 12], "extra": [3, 5]}, hidden_dim=16, num_heads=2,
                                  num_layers=1)
    proj = build_output_projector(cfg, 24)
    out = proj(torch.randn(2, 4, 24))
    assert out["prompt_embeds"].shape == (2, 7, 12) and out["extra"].shape == (2, 3, 5)
    with pytest.raises(ValueError, match="hidden states"):
        proj(torch.randn(2, 4, 23))


# ---------------------------------------------------------------- forcing
def test_signal_span_forcing():
    blocks = {I: [10, 11, 12], A: [20, 21]}
    f = SignalSpanForcing(blocks, max_new_tokens=6)
    scores = torch.zeros(2, 30)
    ids = torch.tensor([[5, 10], [5, 6]])
    out = f(ids, scores)
    assert out[0].argmax() == 11 and int((out[0] < -1e30).sum()) == 29
    # inner tokens are banned unless forced
    assert (out[1, [11, 12, 21]] < -1e30).all() and out[1, 10] == 0 and out[1, 20] == 0
    # no block starts when it cannot finish within the budget
    late = f(torch.tensor([[1, 2, 3, 4, 5]]), torch.zeros(1, 30))
    assert late[0, 10] < -1e30 and late[0, 20] < -1e30


# ---------------------------------------------------------------- text-only pipeline
@pytest.fixture(scope="module")
def text_pipe():
    from anymodal.pipeline import AnyModalPipeline

    torch.manual_seed(0)
    return AnyModalPipeline.from_config(C.AnyModalConfig.from_dict(TEXT_ONLY))


def test_text_to_text_batch_and_single_agree(text_pipe):
    prompts = ["hello", "a longer prompt for padding", "x"]
    batch = text_pipe(prompts, seed=0)
    assert len(batch.text) == 3 and all(isinstance(t, str) for t in batch.text)
    for i, p in enumerate(prompts):
        assert text_pipe(p, seed=0).token_ids[0] == batch.token_ids[i]


def test_text_pipeline_save_load_round_trip(text_pipe, tmp_path):
    from anymodal.pipeline import AnyModalPipeline

    before = text_pipe(["hello", "there"], seed=1)
    text_pipe.save_pretrained(tmp_path / "p")
    assert not list((tmp_path / "p").rglob("*.bin")) and list((tmp_path / "p").rglob("*.safetensors"))
    again = AnyModalPipeline.from_pretrained(tmp_path / "p")
    assert again(["hello", "there"], seed=1).token_ids == before.token_ids


def test_sampling_is_repeatable_with_a_seed(text_pipe):
    a = text_pipe("hi", do_sample=True, temperature=1.5, seed=3)
    b = text_pipe("hi", do_sample=True, temperature=1.5, seed=3)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("prompt, kwargs, error, message", [
    ("", {}, ValueError, "prompt is empty"),
    ("   ", {}, ValueError, "prompt is empty"),
    ([], {}, ValueError, "no prompts"),
    (["ok", 3], {}, TypeError, "prompt must be a string"),
    ("hi", {"images": ["x.png"]}, ValueError, "takes no image input"),
    ("hi", {"settings": {"image": {}}}, ValueError, "this model generates text only"),
    ("hi", {"settings": {"smell": {}}}, ValueError, "unknown modality 'smell'"),
    ("x" * 300, {}, ValueError, "exceeds the model's context of 256 tokens"),
    (None, {}, ValueError, "prompt is required"),
    ({"draw": 1}, {}, TypeError, "got dict"),  # was used by its keys
    ("a\ud800b", {}, ValueError, "lone surrogate"),  # was a tokenizers TypeError
    ("hi", {"max_new_tokens": 0}, ValueError, "max_new_tokens must be a positive integer"),  # was the default
    ("hi", {"seed": 2**64}, ValueError, r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
    ("hi", {"seed": 1.5}, TypeError, "seed must be an integer"),
    ("hi", {"seed": "7"}, TypeError, "seed must be an integer"),
])
def test_bad_calls_raise_specific_errors(text_pipe, prompt, kwargs, error, message):
    with pytest.raises(error, match=message):
        text_pipe(prompt, **kwargs)


def test_from_pretrained_unknown_source(tmp_path):
    from anymodal.pipeline import AnyModalPipeline

    with pytest.raises(FileNotFoundError, match="neither a saved pipeline directory"):
        AnyModalPipeline.from_pretrained("no-such-model")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="not a saved anymodal pipeline"):
        AnyModalPipeline.from_pretrained(tmp_path / "d")


def test_save_does_not_destroy_existing_directory_on_failure(text_pipe, tmp_path, monkeypatch):
    target = tmp_path / "p"
    text_pipe.save_pretrained(target)
    before = sorted(p.name for p in target.rglob("*"))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(text_pipe.processor, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        text_pipe.save_pretrained(target)
    assert sorted(p.name for p in target.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temp directories left behind


@pytest.fixture(scope="module")
def pretrained_llm_dir(tmp_path_factory):
    """A tiny LLM saved the way a downloaded checkpoint sits on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path_factory.mktemp("llm")
    options = dict(TEXT_ONLY["llm"]["config"])
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(options.pop("model_type"), **options))
    model.save_pretrained(d)
    byte_level_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("lora", [None, "lora", "lora+tokens"])
def test_referenced_llm_saves_only_what_changed(pretrained_llm_dir, tmp_path, lora):
    from anymodal.pipeline import AnyModalPipeline

    llm = {"model": str(pretrained_llm_dir), "max_new_tokens": 8}
    if lora == "lora":
        llm["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    pipe = AnyModalPipeline.from_config(C.AnyModalConfig.from_dict({"name": "ref", "llm": llm}))
    if lora == "lora+tokens":  # stage 3 also trains the added rows through peft's trainable tokens
        from peft import LoraConfig, get_peft_model

        pipe.model.language_model = get_peft_model(pipe.model.language_model, LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
            trainable_token_indices={"embed_tokens": pipe.processor.new_token_ids}))
    with torch.no_grad():  # make the adapter and the added rows matter
        g = torch.Generator().manual_seed(0)
        for name, p in pipe.model.language_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        emb = pipe.model.language_model.get_input_embeddings().weight
        ids = pipe.processor.new_token_ids
        emb[ids] = torch.randn(len(ids), emb.shape[1], generator=g)
    prompts = ["hello", "tell me more"]
    before = pipe(prompts, seed=0)
    pipe.save_pretrained(tmp_path / "p")
    saved = tmp_path / "p"
    assert sorted(p.name for p in (saved / "llm").iterdir()) == ["token_rows.safetensors"]
    import json

    llm_entry = json.loads((saved / "anymodal_index.json").read_text())["components"]["llm"]
    assert llm_entry == {"kind": "token_rows", "path": "llm", "base": str(pretrained_llm_dir.resolve())}
    assert (saved / "llm_adapter").is_dir() == bool(lora)
    again = AnyModalPipeline.from_pretrained(saved)
    assert again(prompts, seed=0).token_ids == before.token_ids
    full = tmp_path / "full"
    pipe.save_pretrained(full, save_frozen=True)
    assert (full / "llm" / "model.safetensors").is_file()
    assert AnyModalPipeline.from_pretrained(full)(prompts, seed=0).token_ids == before.token_ids


def test_untied_head_rows_of_added_tokens_round_trip(pretrained_llm_dir, tmp_path):
    """With an untied LM head, the head rows of the added tokens (what makes the model emit a signal
    token) are saved beside the input rows; a reload must give them back, and the same logits."""
    from anymodal.pipeline import AnyModalPipeline

    cfg = C.AnyModalConfig.from_dict({"name": "ref", "llm": {"model": str(pretrained_llm_dir), "max_new_tokens": 8,
                                                             "signal_tokens": {"image": 2}}})
    pipe = AnyModalPipeline.from_config(cfg)
    lm = pipe.model.language_model
    assert not lm.config.tie_word_embeddings and lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight
    ids = pipe.processor.new_token_ids
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lm.get_input_embeddings().weight[ids] = torch.randn(len(ids), 32, generator=g)
        lm.get_output_embeddings().weight[ids] = torch.randn(len(ids), 32, generator=g) * 3
    batch = pipe.processor(["hello <img_0>"])
    with torch.no_grad():
        before = lm(**batch).logits
    pipe.save_pretrained(tmp_path / "p")
    again = AnyModalPipeline.from_pretrained(tmp_path / "p").model.language_model
    torch.testing.assert_close(again.get_output_embeddings().weight[ids], lm.get_output_embeddings().weight[ids],
                               rtol=0, atol=0)
    torch.testing.assert_close(again.get_input_embeddings().weight[ids], lm.get_input_embeddings().weight[ids],
                               rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, before)


def test_llm_config_typos_are_refused():
    from anymodal.pipeline import AnyModalPipeline

    data = {"llm": {**TEXT_ONLY["llm"], "config": {**TEXT_ONLY["llm"]["config"], "hiden_size": 32}}}
    with pytest.raises(ValueError, match="unknown key 'hiden_size' for model_type 'llama'.*did you mean 'hidden_size'"):
        AnyModalPipeline.from_config(C.AnyModalConfig.from_dict(data))


def test_unreachable_weights_name_the_field(monkeypatch):
    from anymodal.pipeline import AnyModalPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = C.AnyModalConfig.from_dict({"llm": {"model": "nobody/no-such-model"}})
    with pytest.raises(OSError) as caught:
        AnyModalPipeline.from_config(cfg)
    assert caught.value.__notes__ == ["cannot load llm.tokenizer 'nobody/no-such-model'. Without network access, "
                                      "set it to a local directory holding the weights."]
