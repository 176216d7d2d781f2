"""Real-shaped random stand-ins for NExT-GPT's released files, at any size.

* :func:`write_delta`: a ``pytorch_model.pt`` with NExT-GPT's key names, shapes and dtype (fp16):
  LoRA on q/k/v/o of every layer, every row of ``embed_tokens`` and ``lm_head`` (base + 38 added
  tokens), ``llama_proj`` and three ``TextFcLayer`` ("transformer" mode) output projectors. At
  :data:`NEXTGPT_7B` that is the released file's 647 keys.
* :func:`write_vicuna`: a Vicuna-shaped Llama folder as the original Vicuna v0 folders ship it:
  fp16 safetensors shards with an index, ``config.json``, and only a slow SentencePiece tokenizer
  (``tokenizer.model``, ``tokenizer_class: LlamaTokenizer``; no ``tokenizer.json``).
* :func:`sentencepiece_model`: a SentencePiece BPE model trained on an in-memory corpus with
  Llama's normaliser settings, padded with unreachable pieces to any vocabulary size.

Key names and shapes come from anymodal's converter table and NExT-GPT's code (60d618b:
``anyToImageVideoAudio.py``, ``layers.py``: ``TextFcLayer`` is ``Linear(4096, 512)``, an
``nn.Transformer(512, nhead=4, 4 + 4 layers, FFN 2048)`` and ``Linear(512, out)``, with learned
``query_embs`` of shape ``(1, queries, 512)``). Values are random; only the layout is real.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    import numpy as np

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
CORPUS = (
    "hello world", "the cat sat on the mat", "a quick brown fox jumps over the lazy dog",
    "### Human: draw a picture of a red car", "### Assistant: sure, here it is", "  double  spaces  here",
    "naïve café crème brûlée", "東京 日本語 中文", "Привет мир", "numbers 0123456789", "show me a video of the sea",
)


@dataclass
class Size:
    """The sizes of a NExT-GPT system: the Vicuna base and the three output projectors."""

    vocab: int = 32000
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    ffn: int = 11008
    lora_r: int = 32
    imagebind_dim: int = 1024
    d_model: int = 512
    proj_heads: int = 4
    proj_layers: int = 4
    proj_ffn: int = 2048
    # modality -> (delta prefix, queries, output width): SD-1.5 (77, 768), AudioLDM (1, 512), Zeroscope (77, 1024)
    outputs: dict[str, tuple[str, int, int]] = field(default_factory=lambda: {
        "image": ("gen_text_hidden_fcs.0.", 77, 768), "video": ("gen_text_hidden_fcs_video.0.", 77, 1024),
        "audio": ("gen_text_hidden_fcs_audio.0.", 1, 512)})


NEXTGPT_7B = Size()
ADDED_TOKENS = 38  # <Img>, </Img>, [IMG0-3], [VID0-23], [AUD0-7]


# ---------------------------------------------------------------------------- tokenizer
def sentencepiece_model(vocab_size: int, corpus: Iterable[str] = CORPUS, trained_pieces: int = 400) -> bytes:
    """A serialized SentencePiece BPE model with Llama's settings (byte fallback, dummy prefix, no
    whitespace folding, ids unk=0 bos=1 eos=2), trained on ``corpus`` in memory and padded with
    unreachable pieces up to ``vocab_size``."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    lines = list(corpus) * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=min(vocab_size, trained_pieces), model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        minloglevel=2)
    proto = pb.ModelProto.FromString(buf.getvalue())
    n = len(proto.pieces)
    for i in range(vocab_size - n):  # filler pieces no merge reaches: the vocabulary size of the real model
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"\u2581filler{i}", -1e6 - i, pb.ModelProto.SentencePiece.NORMAL
    return proto.SerializeToString()


def write_tokenizer(folder: Path, vocab: int) -> None:
    """``tokenizer.model`` plus the small JSON files of an original Vicuna folder (slow class only)."""
    (folder / "tokenizer.model").write_bytes(sentencepiece_model(vocab))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048}, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1))


# ---------------------------------------------------------------------------- the Vicuna base
def llama_config(size: Size) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": size.vocab,
            "hidden_size": size.hidden, "intermediate_size": size.ffn, "num_hidden_layers": size.layers,
            "num_attention_heads": size.heads, "num_key_value_heads": size.heads, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "float16", "initializer_range": 0.02}


def base_shapes(size: Size) -> dict[str, tuple[int, ...]]:
    """LlamaForCausalLM's parameter names and shapes, in the order transformers saves them."""
    h, f = size.hidden, size.ffn
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (size.vocab, h)}
    for i in range(size.layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                       p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (size.vocab, h)
    return shapes


# sign and mantissa bits kept from random bytes, exponent fixed: |x| in [2^-7, 2^-6) (about the spread
# of a trained 7B's weights), drawn at memory speed (torch.randn in float32 took minutes for 7B here)
_BITS = {torch.float16: (0x83FF, 0x2000), torch.bfloat16: (0x807F, 0x3C00)}


def _random(shape: tuple[int, ...], gen: "np.random.Generator", dtype: torch.dtype) -> torch.Tensor:
    import numpy as np

    n = int(torch.Size(shape).numel())
    if len(shape) == 1:  # norms: around 1, as trained ones are
        return (1.0 + 0.02 * torch.from_numpy(gen.standard_normal(n, dtype=np.float32))).to(dtype).reshape(shape)
    if dtype not in _BITS:
        return torch.from_numpy(gen.uniform(-0.0156, 0.0156, n).astype(np.float32)).to(dtype).reshape(shape)
    keep, exponent = _BITS[dtype]
    bits = np.frombuffer(gen.bytes(2 * n), dtype=np.uint16).copy()
    bits &= keep
    bits |= exponent
    return torch.from_numpy(bits.view(np.int16)).view(dtype).reshape(shape)


def write_vicuna(folder: str | os.PathLike, size: Size = NEXTGPT_7B, shard_bytes: int = 2 << 30, seed: int = 0,
                 dtype: torch.dtype = torch.float16) -> Path:
    """A Llama folder of ``size`` with random fp16 weights, written shard by shard (one shard in memory)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(size), indent=1))
    write_tokenizer(folder, size.vocab)
    shapes = base_shapes(size)
    groups: list[list[str]] = [[]]
    used = 0
    item = torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        n = item * int(torch.Size(shape).numel())
        if groups[-1] and used + n > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n
    import numpy as np

    gen = np.random.default_rng(seed)
    weight_map = {}
    total = 0
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        tensors = {name: _random(shapes[name], gen, dtype) for name in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: fname for name in names})
    if len(groups) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return folder


# ---------------------------------------------------------------------------- the NExT-GPT delta
def delta_shapes(size: Size) -> dict[str, tuple[int, ...]]:
    """NExT-GPT's delta keys (peft-wrapped Llama, llama_proj, three TextFcLayers) and their shapes."""
    h, r = size.hidden, size.lora_r
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(size.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            p = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}."
            shapes[p + "lora_A.weight"] = (r, h)
            shapes[p + "lora_B.weight"] = (h, r)
    rows = size.vocab + ADDED_TOKENS
    shapes["llama_model.base_model.model.model.embed_tokens.weight"] = (rows, h)
    shapes["llama_model.base_model.model.lm_head.weight"] = (rows, h)
    shapes["llama_proj.weight"] = (h, size.imagebind_dim)
    shapes["llama_proj.bias"] = (h,)
    import warnings

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor notice of norm_first encoders: nothing runs here
        tfm = torch.nn.Transformer(size.d_model, size.proj_heads, size.proj_layers, size.proj_layers, size.proj_ffn,
                                   batch_first=True, norm_first=True)
    tfm_shapes = {k: tuple(v.shape) for k, v in tfm.state_dict().items()}
    for prefix, queries, out in size.outputs.values():
        shapes[prefix + "fc.weight"] = (size.d_model, h)
        shapes[prefix + "fc.bias"] = (size.d_model,)
        shapes[prefix + "query_embs"] = (1, queries, size.d_model)
        shapes.update({prefix + "tfm." + k: s for k, s in tfm_shapes.items()})
        shapes[prefix + "model.weight"] = (out, size.d_model)
        shapes[prefix + "model.bias"] = (out,)
    return shapes


def write_delta(path: str | os.PathLike, size: Size = NEXTGPT_7B, seed: int = 1) -> Path:
    """NExT-GPT's ``pytorch_model.pt`` layout (a plain dict of fp16 tensors, torch.save zip format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import numpy as np

    gen = np.random.default_rng(seed)
    torch.save({k: _random(s, gen, torch.float16) for k, s in delta_shapes(size).items()}, path)
    return path
