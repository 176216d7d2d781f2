"""The tokens anymodal feeds a converted NExT-GPT equal NExT-GPT's own, for its prompt builders.

NExT-GPT (60d618b, ``NExT-GPT-Lagacy/code``) tokenises with the slow ``LlamaTokenizer`` of
transformers 4.29, whose ``_tokenize`` is ``sp_model.encode(text)``: the SentencePiece model on
the raw text, so a leading space stays a token. The reference below is that, applied to the
prompt NExT-GPT builds:

* ``inference.py``: ``'### Human: ' + input`` (media written inline as ``<Image>path</Image>``);
* ``demo_app.py``: ``'### Human: ' + '<Image>path</Image> ' (per medium) + ' ' + text``;

then ``prepare_generation_embedding``: ``text + '\\n### Assistant:'`` split on ``' <'`` and
``'> '``, each text piece as ``[BOS] + tokens``, each medium as ``<Img> feature </Img>``. The
SentencePiece model is trained in the test; the tiny Vicuna and delta are real-shaped stand-ins.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from anymodal.modality import Modality
from anymodal.processor import AnyModalProcessor, Message

from _nextgpt_standins import TINY, converted as _converted, processor, standins  # noqa: E402,F401

FEATURE = -1  # where a medium's feature goes

def nextgpt_ids(encode, bos: int, wrap: tuple[int, int], prompt: str) -> list[int]:
    """NExT-GPT's prepare_generation_embedding, as token ids (a medium's feature is FEATURE)."""
    ids: list[int] = []
    for piece in re.split(r" <|> ", prompt + "\n### Assistant:"):
        if piece.startswith(("Image>", "Audio>", "Video>")):
            ids += [wrap[0], FEATURE, wrap[1]]
        else:
            ids += [bos] + encode(piece)
    return ids


def anymodal_ids(proc: AnyModalProcessor, text: str, media: dict[Modality, int]) -> list[int]:
    formatted = proc.format([Message("user", proc.place_media(text, media))])
    ids = proc([formatted])["input_ids"][0].tolist()
    placeholders = {proc.placeholder_ids[m] for m in media}
    return [FEATURE if i in placeholders else i for i in ids]


# (anymodal text, media given, NExT-GPT prompt): inline media as inference.py takes them, media given
# without placeholders as demo_app.py builds them, leading spaces, several media, non-ASCII text
CASES = [
    ("draw a cat", {}, "### Human: draw a cat"),
    ("  two leading spaces", {}, "### Human:   two leading spaces"),
    ("<image> what is this?", {Modality.IMAGE: 1}, "### Human: <Image>a.png</Image> what is this?"),
    ("<image>  leading space after a medium", {Modality.IMAGE: 1},
     "### Human: <Image>a.png</Image>  leading space after a medium"),
    ("draw a cat", {Modality.IMAGE: 1}, "### Human: <Image>a.png</Image>  draw a cat"),  # demo_app.py
    ("  東京 naïve café", {Modality.AUDIO: 1}, "### Human: <Audio>a.wav</Audio>    東京 naïve café"),
    ("<image> and <audio> together, Привет <video> 日本語 ", {Modality.IMAGE: 1, Modality.AUDIO: 1, Modality.VIDEO: 1},
     "### Human: <Image>a.png</Image> and <Audio>b.wav</Audio> together, Привет <Video>c.mp4</Video> 日本語 "),
]


@pytest.mark.parametrize("text,media,prompt", CASES)
def test_tokens_equal_nextgpt(processor, standins, text, media, prompt):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(standins[0] / "tokenizer.model"))
    tok = processor.tokenizer
    wrap = tuple(tok.convert_tokens_to_ids(["<Img>", "</Img>"]))
    assert anymodal_ids(processor, text, media) == nextgpt_ids(sp.encode, tok.bos_token_id, wrap, prompt)


def test_several_media_without_placeholders_each_stay_a_medium(processor, standins):
    """demo_app.py writes '<Image>a</Image> <Audio>b</Audio> ' + ' ' + text; its split on ' <' and '> '
    then leaves '<Audio>b</Audio' as text (a '>' eats the space before the next '<'). anymodal keeps
    every medium a medium, in demo_app's order, and the text its one leading space."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(standins[0] / "tokenizer.model"))
    tok = processor.tokenizer
    o, c = tok.convert_tokens_to_ids(["<Img>", "</Img>"])
    bos = tok.bos_token_id
    want = [bos] + sp.encode("### Human:") + [o, FEATURE, c, o, FEATURE, c] + [bos] + sp.encode(" hi\n### Assistant:")
    assert anymodal_ids(processor, "hi", {Modality.IMAGE: 1, Modality.AUDIO: 1}) == want


def test_slow_tokenizer_is_the_one_that_matches(processor, standins):
    """Both transformers classes over the same tokenizer.model, against SentencePiece itself: the
    converter takes a class whose ids are NExT-GPT's (the slow one; the fast conversion drops a
    leading space in transformers 5)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from anymodal.tokenization import load_tokenizer_from

    sp = spm.SentencePieceProcessor(model_file=str(standins[0] / "tokenizer.model"))
    texts = [" hello", "  hello world", " 東京 naïve\n### Assistant:", "hello", "Привет  мир "]
    slow = load_tokenizer_from(standins[0], "sentencepiece")
    fast = AutoTokenizer.from_pretrained(str(standins[0]))
    matches = {name: all(t(x, add_special_tokens=False)["input_ids"] == sp.encode(x) for x in texts)
               for name, t in (("slow", slow), ("fast", fast))}
    assert matches["slow"]
    assert type(processor.tokenizer) is type(slow)
    assert all(processor.tokenizer(x, add_special_tokens=False)["input_ids"] == sp.encode(x) for x in texts)


def test_folder_with_fast_tokenizer_too_converts_with_the_slow_one(tmp_path, standins):
    """A Vicuna folder that also holds tokenizer.json (saved by the fast class) still converts with
    the SentencePiece model, as NExT-GPT's LlamaTokenizer reads it."""
    import shutil

    from transformers import AutoTokenizer

    vicuna = tmp_path / "vicuna-fast"
    shutil.copytree(standins[0], vicuna)
    AutoTokenizer.from_pretrained(str(standins[0])).save_pretrained(vicuna)
    assert (vicuna / "tokenizer.json").is_file() and (vicuna / "tokenizer.model").is_file()
    proc = AnyModalProcessor.from_pretrained(_converted(tmp_path, standins, vicuna) / "processor")
    assert proc.tokenizer(" hello", add_special_tokens=False)["input_ids"] == \
        __import__("sentencepiece").SentencePieceProcessor(model_file=str(vicuna / "tokenizer.model")).encode(" hello")


def test_nextgpt_tokens_are_added_as_nextgpt_adds_them(processor):
    """add_tokens, not special tokens: skip_special_tokens decoding keeps them, as in NExT-GPT."""
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(["<Img>", "[IMG0]", "[AUD7]"])
    assert ids == [TINY.vocab, TINY.vocab + 2, TINY.vocab + 37]
    assert "[IMG0]" in tok.decode(ids, skip_special_tokens=True)


def test_llm_folder_without_tokenizer_is_one_line(tmp_path, standins):
    import shutil

    vicuna = tmp_path / "vicuna-no-tok"
    shutil.copytree(standins[0], vicuna)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (vicuna / name).unlink()
    with pytest.raises(FileNotFoundError) as e:
        _converted(tmp_path, standins, vicuna)
    msg = str(e.value)
    assert "\n" not in msg and str(vicuna) in msg and "tokenizer.model" in msg and "tokenizer.json" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module,package", [("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")])
def test_missing_optional_package_is_named(tmp_path, standins, monkeypatch, module, package):
    from anymodal.tokenization import load_tokenizer_from

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    backend = "sentencepiece" if module == "sentencepiece" else "auto"
    with pytest.raises(ImportError, match=f"pip install {package}$") as e:
        load_tokenizer_from(standins[0], backend)
    assert "tiktoken" not in str(e.value)


def test_dependencies_are_declared():
    import tomllib

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in deps}
    assert {"sentencepiece", "protobuf"} <= names


def test_config_chooses_the_slow_tokenizer(standins):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from anymodal.config import LLMConfig
    from anymodal.model import load_tokenizer

    tok = load_tokenizer(LLMConfig(model=str(standins[0]), tokenizer_backend="sentencepiece"))
    assert isinstance(tok, SentencePieceBackend) and tok.legacy
    assert not isinstance(load_tokenizer(LLMConfig(model=str(standins[0]))), SentencePieceBackend)
    with pytest.raises(ValueError, match="llm.tokenizer_backend"):
        LLMConfig(model="x", tokenizer_backend="slow")
