"""Tokenizers that need no download: a byte-level BPE built in memory.

Tiny test models and locally trained models use it; real checkpoints bring their own.
"""

from __future__ import annotations

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
