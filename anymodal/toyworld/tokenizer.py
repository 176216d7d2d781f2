"""The ``tokenizer`` phase: a word-level tokenizer over every text the toy world produces.

Every caption of every spec (both splits) and the texts of sampled dialogues, lowercased and split
on whitespace and punctuation, saved as a transformers ``PreTrainedTokenizerFast`` directory in
``out/tokenizer``. The generators' text encoders and the LLM all read it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..modality import Modality
from . import world
from .loop import JsonlLog, atomic_dir
from .recipe import TokenizerPhase


SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "<s>", "</s>")


def world_texts(n_dialogues: int, seed: int) -> Iterator[str]:
    """Every caption of every spec (both splits), the audio captions prompts leave partial, and
    the texts of ``n_dialogues`` sampled dialogues per split (prompts, questions, answers, edits)."""
    for m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
        for spec in world.all_specs(m, "all"):
            yield spec.caption()
            if isinstance(spec, world.AudioSpec):
                yield replace(spec, note=None).caption()
                yield replace(spec, duration=None).caption()
    g = np.random.default_rng(seed)
    for split in world.SPLITS:
        for _ in range(n_dialogues):
            for _, text in world.sample_dialogue(g, split, render_media=False).texts():
                yield text


def build_tokenizer(texts: Iterator[str], model_max_length: int) -> Any:
    """A word-level ``PreTrainedTokenizerFast``: lowercased, split on whitespace and punctuation,
    ``<s> ... </s>`` around every text, right padding with ``[PAD]``, ``[UNK]`` for unknown words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B </s>",
                                                       special_tokens=[("<s>", bos), ("</s>", eos)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies "word ?"
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>", model_max_length=model_max_length, padding_side="right")


def train_tokenizer(out: Path, cfg: TokenizerPhase, log: JsonlLog) -> Path:
    t0 = time.time()
    texts = list(world_texts(cfg.dialogues, cfg.seed))
    tokenizer = build_tokenizer(iter(texts), cfg.model_max_length)
    unknown = sum(tokenizer.unk_token_id in ids for ids in tokenizer(texts[-2000:])["input_ids"])
    path = atomic_dir(out / "tokenizer", tokenizer.save_pretrained)
    longest = max(len(ids) for ids in tokenizer(texts)["input_ids"])
    log.write(stage="tokenizer", event="done", vocab_size=len(tokenizer), texts=len(texts), longest_tokens=longest,
              unknown_in_last_2000=unknown, seconds=round(time.time() - t0, 2))
    return path


def load_tokenizer(out: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    path = out / "tokenizer"
    if not (path / "tokenizer.json").exists():
        raise ValueError(f"no trained tokenizer in {path}; run the 'tokenizer' phase first "
                         f"(anymodal toyworld train --out {out} --phase tokenizer)")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
