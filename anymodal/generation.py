"""Text generation with signal-span forcing, and capture of the signal tokens' hidden states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from .modality import Modality


class SignalSpanForcing(LogitsProcessor):
    """Once a row emits the first token of a signal block, force the rest of the block.

    Later tokens of a block can only appear when forced, and a block is not started when it
    would not fit in the remaining budget, so a partial block never occurs.
    """

    def __init__(self, blocks: dict[Modality, list[int]], max_new_tokens: int, prompt_length: int = 0):
        self.next_of: dict[int, int] = {}
        self.starts: dict[int, int] = {}  # first id -> block length
        inner: list[int] = []
        for ids in blocks.values():
            self.starts[ids[0]] = len(ids)
            for a, b in zip(ids, ids[1:]):
                self.next_of[a] = b
            inner.extend(ids[1:])
        self.inner = torch.tensor(inner, dtype=torch.long)
        self.max_new_tokens = max_new_tokens
        self.prompt_length = prompt_length  # input_ids include the prompt when it is given as ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        neg = torch.finfo(scores.dtype).min
        if len(self.inner):
            scores[:, self.inner.to(scores.device)] = neg
        remaining = self.max_new_tokens - (input_ids.shape[1] - self.prompt_length)
        for first, length in self.starts.items():
            if length > remaining:
                scores[:, first] = neg
        if input_ids.shape[1] > self.prompt_length:
            last = input_ids[:, -1].tolist()
            for row, tok in enumerate(last):
                forced = self.next_of.get(tok)
                if forced is not None:
                    scores[row] = neg
                    scores[row, forced] = 0.0
        return scores


class ReplyStreamer(BaseStreamer):
    """transformers' streamer protocol, for ``on_text``: after each generated token, each row's reply
    so far, decoded as the final text is (:meth:`~anymodal.processor.AnyModalProcessor.split_output`:
    signal blocks as placeholders, special tokens and stop strings left out).

    Unlike ``TextIteratorStreamer`` it takes a batch, and it runs in ``generate``'s own thread, so an
    exception raised by ``on_text`` stops the generation at once and propagates out of it.
    """

    def __init__(self, processor, on_text: Callable[[list[str]], None]):
        self.processor = processor
        self.on_text = on_text
        self.rows: list[list[int]] | None = None
        self.done: list[bool] = []

    def put(self, value: torch.Tensor) -> None:
        if value.ndim == 2:  # generate's first call: the prompt's ids (none when it starts from embeddings)
            self.rows = [[] for _ in range(value.shape[0])]
            self.done = [False] * value.shape[0]
            return
        eos = self.processor.tokenizer.eos_token_id
        for i, token in enumerate(value.tolist()):
            if not self.done[i]:  # a finished row is padded from here on
                self.rows[i].append(token)
                self.done[i] = token == eos
        self.on_text([self.processor.split_output(ids)[0] for ids in self.rows])

    def end(self) -> None:
        pass


@dataclass
class TextGeneration:
    """What the LLM step produced for a batch."""

    sequences: list[list[int]]  # generated ids per row, up to and including EOS
    # per row: list of (modality, start index in sequences[row]) of each complete signal block
    spans: list[list[tuple[Modality, int]]]
    # per modality: hidden states (n_blocks, block_len, hidden) in (row, span) reading order
    signal_hidden: dict[Modality, torch.Tensor]


def generate_text(model, processor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  media: dict[Modality, torch.Tensor], max_new_tokens: int, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0,
                  logits_processor: list[LogitsProcessor] | None = None,
                  on_text: Callable[[list[str]], None] | None = None) -> TextGeneration:
    """Generate with a KV cache and read the hidden state of each signal token on the way.

    ``generate`` reports the state that *produced* each new token, not the state *of* it. The
    state of token ``j`` is computed at step ``j + 1``, when ``j`` is fed back in; a hook on the
    LM head's input catches it there, so no second pass is needed. Only when a block is the very
    last thing generated (its last state is never computed) does one forward pass over prompt +
    generated tokens supply it.

    ``on_text``, if given, is called after each token with each row's reply so far (:class:`ReplyStreamer`).
    """
    lm = model.language_model
    embeds = model.embed(input_ids, media)
    tok = processor.tokenizer
    eos = tok.eos_token_id
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id,
                      eos_token_id=eos, logits_processor=LogitsProcessorList(
                          [*(logits_processor or []), SignalSpanForcing(processor.signal_ids, max_new_tokens)]))
    # Input placeholders stand for media features; a model never writes one.
    gen_kwargs["suppress_tokens"] = sorted(processor.placeholder_ids.values())
    if processor.prompt_options.stop_strings:
        gen_kwargs.update(stop_strings=list(processor.prompt_options.stop_strings), tokenizer=tok)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:  # silence model-default sampling settings (e.g. a generation_config with temperature)
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    # The states each output projector reads: the last layer's (the LM head's input) by default, or a
    # decoder layer's output (OutputProjectorConfig.hidden_layer), caught by a hook on that layer.
    last = model.llm_config.num_hidden_layers
    layers = set(model.signal_layers.values()) | {last}
    steps: dict[int, list[torch.Tensor]] = {k: [] for k in layers}

    def capture(_module, args):
        steps[last].append(args[0][:, -1])

    def capture_layer(k: int):
        def hook(_module, _args, output):
            steps[k].append((output[0] if isinstance(output, tuple) else output)[:, -1])
        return hook

    handles = [lm.get_output_embeddings().register_forward_pre_hook(capture)]
    if layers - {last}:
        decoder = model.decoder_layers()
        handles += [decoder[k - 1].register_forward_hook(capture_layer(k)) for k in sorted(layers - {last})]
    try:
        streamer = ReplyStreamer(processor, on_text) if on_text is not None else None
        out = lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, streamer=streamer, **gen_kwargs)
    finally:
        for handle in handles:
            handle.remove()

    sequences: list[list[int]] = []
    for row in out.tolist():
        ids = []
        for t in row:
            ids.append(t)
            if t == eos:
                break
        stop = processor.stop_length(ids)
        sequences.append(ids if stop is None else ids[:stop])
    spans = [processor.split_output(seq)[1] for seq in sequences]
    signal_hidden: dict[Modality, torch.Tensor] = {}
    if any(spans):
        n_known = len(steps[last]) - 1  # states of generated tokens 0 .. n_known-1
        ends = [start + processor.signal_tokens[m] for row in spans for m, start in row]
        if max(ends) <= n_known:
            states = {k: torch.stack(v[1:], dim=1) for k, v in steps.items()}  # (batch, generated, hidden)
        else:
            states = _signal_states(model, embeds, attention_mask, sequences, processor, sorted(layers))
        # a signal block with no output projector (no generator for it) is gathered from the last layer
        signal_hidden = _gather(states, spans, processor, lambda m: model.signal_layers.get(m, last))
    return TextGeneration(sequences, spans, signal_hidden)


def _gather(states: dict[int, torch.Tensor], spans: list[list[tuple[Modality, int]]], processor,
            layer: Callable[[Modality], int]) -> dict[Modality, torch.Tensor]:
    grouped: dict[Modality, list[torch.Tensor]] = {}
    for row, row_spans in enumerate(spans):
        for m, start in row_spans:
            grouped.setdefault(m, []).append(states[layer(m)][row, start: start + processor.signal_tokens[m]])
    return {m: torch.stack(v) for m, v in grouped.items()}


def _signal_states(model, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor, sequences: list[list[int]],
                   processor, layers: list[int]) -> dict[int, torch.Tensor]:
    """The states ``(batch, generated, hidden)`` of the generated tokens at each of ``layers`` (indices
    into transformers' ``hidden_states``), by one forward pass."""
    device = prompt_embeds.device
    width = max(len(s) for s in sequences)
    pad = processor.tokenizer.pad_token_id
    gen = torch.full((len(sequences), width), pad, dtype=torch.long, device=device)
    gen_mask = torch.zeros_like(gen)
    for i, s in enumerate(sequences):
        gen[i, :len(s)] = torch.tensor(s, device=device)
        gen_mask[i, :len(s)] = 1
    gen_embeds = model.language_model.get_input_embeddings()(gen)
    embeds = torch.cat([prompt_embeds, gen_embeds.to(prompt_embeds.dtype)], dim=1)
    mask = torch.cat([prompt_mask, gen_mask], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                               output_hidden_states=True, use_cache=False)
    return {k: out.hidden_states[k][:, prompt_embeds.shape[1]:] for k in layers}
