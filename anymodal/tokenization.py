"""Tokenizers: a byte-level BPE built in memory (tiny test models and locally trained models use it;
real checkpoints bring their own), and loading a checkpoint's tokenizer with the class its system used."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast


def byte_level_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A 256-symbol byte-level tokenizer (no merges) with ``<s>``, ``</s>``, ``<pad>``, ``<unk>``.

    It can encode any UTF-8 text, so it is a real tokenizer, just a long-winded one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    return fast


# ---------------------------------------------------------------------------- loading from a folder
# What each optional package is for, so that a missing one is named (transformers' own message for a
# folder holding only tokenizer.model asks for tiktoken, which is not what is missing).
OPTIONAL_PACKAGES = {
    "sentencepiece": "reading a SentencePiece tokenizer.model (Llama/Vicuna folders)",
    "google.protobuf": "reading a SentencePiece tokenizer.model (Llama/Vicuna folders)",
}
PIP_NAMES = {"google.protobuf": "protobuf"}
TOKENIZER_BACKENDS = ("auto", "sentencepiece")


def require(module: str, purpose: str | None = None) -> None:
    """Raise ``ImportError`` naming the pip package when ``module`` cannot be imported."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        package = PIP_NAMES.get(module, module)
        why = purpose or OPTIONAL_PACKAGES.get(module, "this step")
        raise ImportError(f"the package {package!r} is needed for {why} but is not installed; "
                          f"install it with: pip install {package}") from None


def tokenizer_files(folder: str | os.PathLike) -> list[str]:
    """The tokenizer files a folder holds (``tokenizer.json``, ``tokenizer.model``, ``vocab.json``...)."""
    known = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
             "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "tokenizer.tiktoken")
    return [name for name in known if (Path(folder) / name).is_file()]


def load_tokenizer_from(source: str | os.PathLike, backend: str = "auto", what: str = "tokenizer", **kwargs: Any):
    """A tokenizer from a local folder or hub id.

    ``backend="sentencepiece"``: the slow SentencePiece tokenizer of ``tokenizer.model`` with the
    behaviour of transformers 4.x's ``LlamaTokenizer`` (``legacy``: the text goes to SentencePiece as
    it is, so a leading space stays a token). That is the tokenizer NExT-GPT and the original Vicuna
    code use; the fast conversion drops the leading space of ``" hello"``. ``"auto"``: whatever
    ``AutoTokenizer`` gives. A local folder with nothing usable is one error naming the folder and
    the files it lacks; a missing optional package is named.
    """
    if backend not in TOKENIZER_BACKENDS:
        raise ValueError(f"tokenizer backend must be one of {', '.join(TOKENIZER_BACKENDS)}, got {backend!r}")
    local = os.path.isdir(source)
    files = tokenizer_files(source) if local else []
    if local and not kwargs.get("gguf_file") and not any(f != "tokenizer_config.json" for f in files):
        found = sorted(p.name for p in Path(source).iterdir())
        raise FileNotFoundError(
            f"{what}: {source} has no usable tokenizer: it needs tokenizer.model (SentencePiece, as Llama/Vicuna "
            f"ship) or tokenizer.json (a fast tokenizer); found {', '.join(found[:12]) or 'nothing'}"
            f"{' ...' if len(found) > 12 else ''}")
    if local and "tokenizer.model" in files and (backend == "sentencepiece" or "tokenizer.json" not in files):
        require("sentencepiece")
        if backend == "auto":
            require("google.protobuf")  # transformers converts tokenizer.model to a fast tokenizer
    if backend == "sentencepiece":
        if local and "tokenizer.model" not in files:
            raise FileNotFoundError(f"{what}: {source} has no tokenizer.model (the SentencePiece model a slow "
                                    f"Llama tokenizer reads); found {', '.join(files) or 'no tokenizer files'}")
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        kwargs.setdefault("legacy", True)
        return SentencePieceBackend.from_pretrained(str(source), **kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source), **kwargs)
