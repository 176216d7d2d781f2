"""What a real-size NExT-GPT conversion needs beyond the parity tests: the converter's flags, its
checks of the ImageBind file, memory-minded writing of the embedding rows, and the load path
(rows read in slices, no random init of rows that are loaded anyway, generators when needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _nextgpt_standins import TINY, converted, imagebind_file, standins, tiny_generators  # noqa: F401
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


# ---------------------------------------------------------------- memory-minded conversion and loading
def test_token_rows_are_streamed_exactly(tmp_path, standins):
    from safetensors.torch import load_file

    from anymodal.convert.nextgpt import load_delta

    out = converted(tmp_path, standins)
    rows = load_file(str(out / "llm" / "token_rows.safetensors"))
    delta = load_delta(standins[1])
    total = rows["token_ids"].shape[0]
    assert rows["token_ids"].tolist() == list(range(total))
    for name, key in (("input_rows", "llama_model.base_model.model.model.embed_tokens.weight"),
                      ("output_rows", "llama_model.base_model.model.lm_head.weight")):
        t = delta[key]
        assert rows[name].dtype == t.dtype
        assert torch.equal(rows[name][:t.shape[0]], t) and not rows[name][t.shape[0]:].any()


def test_write_safetensors_in_blocks_round_trips(tmp_path):
    from safetensors.torch import load_file

    from anymodal.lowmem import row_blocks, write_safetensors

    a = torch.randn(10, 3).to(torch.bfloat16)
    b = torch.arange(7)
    write_safetensors(tmp_path / "x.safetensors", [("a", a.dtype, (13, 3), row_blocks(a, 3, rows=4)),
                                                   ("b", b.dtype, (7,), lambda: iter([b[:2], b[2:]]))])
    got = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(got["a"][:10], a) and not got["a"][10:].any() and torch.equal(got["b"], b)
    with pytest.raises(ValueError, match="expected"):
        write_safetensors(tmp_path / "y.safetensors", [("a", a.dtype, (11, 3), row_blocks(a))])


def test_loading_grows_rows_from_the_file_without_random_init(tmp_path, standins, monkeypatch):
    from transformers import PreTrainedModel

    from anymodal.convert.nextgpt import load_delta
    from anymodal.pipeline import AnyModalPipeline

    out = converted(tmp_path, standins, imagebind=None)

    def refuse(*a, **k):
        raise AssertionError("resize_token_embeddings initialises rows that are overwritten next")

    monkeypatch.setattr(PreTrainedModel, "resize_token_embeddings", refuse)
    initialised = []
    normal = torch.nn.init.normal_

    def record(*a, **k):  # random init of real (not meta) tensors
        t = a[0] if a else k["tensor"]
        if t.device.type != "meta":
            initialised.append(tuple(t.shape))
        return normal(*a, **k)

    monkeypatch.setattr(torch.nn.init, "normal_", record)
    pipe = AnyModalPipeline.from_pretrained(out, text_only=True)
    assert not [s for s in initialised if s[0] >= TINY.vocab]
    lm = pipe.model.language_model.get_base_model()
    delta = load_delta(standins[1])
    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    n = delta["llama_model.base_model.model.lm_head.weight"].shape[0]
    assert emb.shape[0] == head.shape[0] == len(pipe.processor.tokenizer) == lm.config.vocab_size
    assert torch.equal(emb[:n], delta["llama_model.base_model.model.model.embed_tokens.weight"].float())
    assert torch.equal(head[:n], delta["llama_model.base_model.model.lm_head.weight"].float())
    assert not emb[n:].any()


def test_added_rows_only_keep_the_base_rows(tmp_path):
    """A rows file with only the added tokens (embedding_rows: added): base rows stay, the file's go in."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from anymodal.lowmem import grow_token_rows

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    base_in, base_out = lm.get_input_embeddings().weight.clone(), lm.get_output_embeddings().weight.clone()
    rows_in, rows_out = torch.randn(3, 8), torch.randn(3, 8)
    save_file({"token_ids": torch.tensor([20, 21, 23]), "input_rows": rows_in, "output_rows": rows_out},
              str(tmp_path / "rows.safetensors"))
    grow_token_rows(lm, 24, tmp_path / "rows.safetensors", block=2)
    w_in, w_out = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    assert w_in.shape == w_out.shape == (24, 8) and lm.config.vocab_size == 24
    assert torch.equal(w_in[:20], base_in) and torch.equal(w_out[:20], base_out)
    assert torch.equal(w_in[[20, 21, 23]], rows_in) and torch.equal(w_out[[20, 21, 23]], rows_out)
    assert not w_in[22].any()
    assert lm(torch.tensor([[23, 1]])).logits.shape == (1, 2, 24)
    save_file({"token_ids": torch.tensor([99]), "input_rows": torch.zeros(1, 8)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        grow_token_rows(lm, 24, tmp_path / "bad.safetensors")


def test_dtype_is_converted_tensor_by_tensor(tmp_path):
    """llm.dtype other than the stored one: the same tensors as transformers' own conversion."""
    import sys

    from transformers import AutoModelForCausalLM

    from anymodal.config import LLMConfig
    from anymodal.model import load_language_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from standins import write_vicuna

    folder = write_vicuna(tmp_path / "base", TINY, shard_bytes=20_000)
    assert (folder / "model.safetensors.index.json").is_file()  # several shards
    ours = load_language_model(LLMConfig(model=str(folder), dtype="bfloat16"))
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_vocabulary_is_read_once(tmp_path, standins, monkeypatch):
    """anymodal asks for the whole vocabulary once per step, not once per token (a slow tokenizer
    builds it token by token: 32000 entries per call for Vicuna). transformers' own calls (one per
    add_tokens call) are not counted."""
    import sys

    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from anymodal.processor import AnyModalProcessor

    calls = []
    original = SentencePieceBackend.get_vocab

    def counted(self):
        if "transformers" not in sys._getframe(1).f_code.co_filename:
            calls.append(sys._getframe(1).f_code.co_name)
        return original(self)

    monkeypatch.setattr(SentencePieceBackend, "get_vocab", counted)
    out = converted(tmp_path, standins)
    assert sorted(calls) == ["__init__", "_tokenizer"]  # the converter once, the processor once
    calls.clear()
    AnyModalProcessor.from_pretrained(out / "processor")
    assert calls == ["__init__"]


# ---------------------------------------------------------------- generators: when needed, or not at all
@pytest.fixture(scope="module")
def with_generators(tmp_path_factory, standins) -> Path:
    tmp = tmp_path_factory.mktemp("gens")
    return converted(tmp, standins, generators=tiny_generators(tmp))


def test_generators_load_when_first_needed(with_generators):
    from anymodal.modality import Modality
    from anymodal.pipeline import AnyModalPipeline

    pipe = AnyModalPipeline.from_pretrained(with_generators)
    gens = pipe.generators
    assert set(gens) == {Modality.IMAGE, Modality.AUDIO, Modality.VIDEO}
    assert not any(g.is_loaded for g in gens.values())  # shapes checked from the configs alone
    cond = {"prompt_embeds": torch.zeros(1, 16, 32)}
    images = gens[Modality.IMAGE].render(cond, {"num_inference_steps": 1, "height": 16, "width": 16})
    assert len(images) == 1 and gens[Modality.IMAGE].is_loaded and not gens[Modality.VIDEO].is_loaded
    eager = AnyModalPipeline.from_pretrained(with_generators, lazy_generators=False)
    assert eager.generators[Modality.IMAGE].is_loaded and eager.generators[Modality.AUDIO].is_loaded
    assert not eager.generators[Modality.VIDEO].is_loaded  # nextgpt-7b.yaml: video `lazy: true` (Zeroscope)


def test_text_only_and_torch_dtype(with_generators, tmp_path):
    from anymodal.pipeline import AnyModalPipeline

    pipe = AnyModalPipeline.from_pretrained(with_generators, text_only=True, torch_dtype=torch.bfloat16)
    assert pipe.generators == {} and pipe.text_only and len(pipe.model.output_projectors) == 0
    lm = pipe.model.language_model
    # peft keeps LoRA weights in float32 over a half-precision base (its autocast_adapter_dtype)
    assert {p.dtype for n, p in lm.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    out = pipe("hello", max_new_tokens=2)
    assert len(out.token_ids[0]) <= 2 and out.images == [[]]
    with pytest.raises(ValueError, match="text_only"):
        pipe.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again").exists()
    with pytest.raises(ValueError, match="torch_dtype|dtype"):
        AnyModalPipeline.from_pretrained(with_generators, text_only=True, torch_dtype="float8")


def test_text_only_from_a_config():
    from anymodal.pipeline import AnyModalPipeline

    pipe = AnyModalPipeline.from_pretrained("tiny", text_only=True)
    assert pipe.generators == {} and len(pipe.model.output_projectors) == 0 and pipe.processor.signal_ids
    assert len(pipe("hello", max_new_tokens=3).token_ids[0]) <= 3


def test_unfetchable_generator_is_one_line_and_nothing_contacts_the_hub(tmp_path, standins, monkeypatch, capsys):
    """The converter's default generators are hub ids; offline, loading names the component, the id and
    the fix at once (no retries, no connection), and --text-only loads without them."""
    import socket

    from anymodal.pipeline import AnyModalPipeline, GeneratorUnavailable

    out = converted(tmp_path, standins, imagebind=None)  # generators: NExT-GPT's hub ids
    connections = []
    monkeypatch.setattr(socket.socket, "connect", lambda *a: connections.append(a) or (_ for _ in ()).throw(OSError))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GeneratorUnavailable) as e:
        AnyModalPipeline.from_pretrained(out)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("generators.image:")
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "--image-generator" in msg and "text_only" in msg
    rc = cli_main(["generate", "hello", "--model", str(out), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "generators.image" in err[0] and "--text-only" in err[0]
    rc = cli_main(["generate", "hello", "--model", str(out), "--out", str(tmp_path / "o"), "--text-only",
                   "--max-new-tokens", "2"])
    assert rc == 0
    assert connections == []


def test_cpu_fp16_warning_is_shown_once(tmp_path):
    import logging

    from anymodal.config import AnyModalConfig, GeneratorConfig
    from anymodal.registry import GENERATORS

    for f in logging.getLogger("diffusers.pipelines.pipeline_utils").filters:
        if hasattr(f, "seen"):
            f.seen.clear()  # another test may have shown it already
    g = AnyModalConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").generators
    image = next(v for k, v in g.items() if k.value == "image")
    gen = GENERATORS.get(image.type).from_config(GeneratorConfig(type=image.type, components=image.components,
                                                                 dtype="float16"))
    from diffusers.utils import logging as dlog

    # count the records themselves: diffusers' own stream handler keeps whatever sys.stderr was when it
    # was made (another test's capture, in a full run), so what reaches the terminal is not testable here
    records: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Count()
    target = logging.getLogger("diffusers.pipelines.pipeline_utils")
    target.addHandler(handler)
    level = dlog.get_verbosity()
    dlog.set_verbosity_warning()  # the CLI (run by other tests in this process) sets it to errors only
    try:
        gen.to("cpu")
        gen.to("cpu")
    finally:
        dlog.set_verbosity(level)
        target.removeHandler(handler)
    assert sum("cannot run with `cpu` device" in r for r in records) == 1


def test_convert_progress_advances_through_the_embedding_rows(tmp_path, standins, monkeypatch):
    """One bar, in bytes, that moves while the embedding rows (most of the file) are written, and ends full."""
    import tqdm.auto

    from anymodal import lowmem

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.steps = []
            bars.append(self)

        def update(self, n=1):
            self.steps.append(n)
            return super().update(n)

    original = lowmem.row_blocks
    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    monkeypatch.setattr(lowmem, "row_blocks", lambda t, extra=0, rows=4096: original(t, extra, rows=64))
    converted(tmp_path, standins, progress=True)
    assert len(bars) == 1
    bar = bars[0]
    assert bar.n == bar.total
    rows_bytes = 2 * (TINY.vocab + 38) * TINY.hidden * 2
    assert sum(1 for n in bar.steps if n <= 64 * TINY.hidden * 2) >= rows_bytes // (64 * TINY.hidden * 2)


# ---------------------------------------------------------------- which hidden states NExT-GPT reads
def test_nextgpt_reads_the_signal_tokens_own_states(tmp_path, standins):
    """NExT-GPT (inference: generate_tokens_embeddings, generate_images) calls ``generate`` with
    ``inputs_embeds`` alone under transformers 4.29.2, whose ``_maybe_initialize_input_ids_for_generation``
    starts ``input_ids`` as one BOS placeholder per row, so ``outputs.sequences`` is that placeholder
    followed by the new tokens. It concatenates ``outputs.hidden_states[1:]`` (the states of the tokens
    fed back, one per step) and slices ``[gen_idx - 1 : gen_idx - 1 + 4]`` with ``gen_idx`` the index
    of ``[IMG0]`` in ``sequences``. Driven that way here (the placeholder put back in front, as 4.29
    returns it), the slice is the signal tokens' own states: the ones anymodal reads."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from anymodal.generation import SignalSpanForcing, generate_text
    from anymodal.modality import Modality
    from anymodal.pipeline import AnyModalPipeline
    from anymodal.processor import Message

    pipe = AnyModalPipeline.from_pretrained(converted(tmp_path, standins, imagebind=None), text_only=True)
    proc, model = pipe.processor, pipe.model
    img = proc.signal_ids[Modality.IMAGE]

    class SecondIsImg0(LogitsProcessor):  # one ordinary token, then [IMG0] (anymodal forces the rest)
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == 1:
                scores = torch.full_like(scores, float("-inf"))
                scores[:, img[0]] = 0.0
            return scores

    batch = proc([proc.format([Message("user", "draw a red square")])])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ours = generate_text(model, proc, ids, mask, {}, 8, logits_processor=[SecondIsImg0()])
        assert ours.spans == [[(Modality.IMAGE, 1)]]
        lm = model.language_model
        out = lm.generate(inputs_embeds=model.embed(ids), attention_mask=mask, max_new_tokens=8, do_sample=False,
                          output_hidden_states=True, return_dict_in_generate=True,
                          pad_token_id=proc.tokenizer.pad_token_id, logits_processor=LogitsProcessorList(
                              [SecondIsImg0(), SignalSpanForcing(proc.signal_ids, 8)]))
    sequences = [proc.tokenizer.bos_token_id] + out.sequences[0].tolist()  # 4.29.2's layout
    gen_idx = sequences.index(img[0])
    embeddings = torch.cat([h[-1] for h in out.hidden_states[1:]], dim=1)  # text_emb_to_img_layers: [-1]
    nextgpt = embeddings[:, gen_idx - 1: gen_idx - 1 + len(img)]
    assert sequences[gen_idx: gen_idx + len(img)] == img
    torch.testing.assert_close(nextgpt, ours.signal_hidden[Modality.IMAGE], rtol=1e-5, atol=1e-5)
    # and they are the states *of* [IMG0..3]: a plain forward pass over prompt + generated tokens
    full = torch.cat([model.embed(ids), lm.get_input_embeddings()(out.sequences)], dim=1)
    states = lm(inputs_embeds=full, output_hidden_states=True).hidden_states[-1]
    start = ids.shape[1] + 1
    torch.testing.assert_close(states[:, start: start + len(img)], nextgpt, rtol=1e-4, atol=1e-4)
