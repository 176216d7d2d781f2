"""What trains in each stage, and the module whose forward pass computes a stage's loss.

``training.trainable`` names parameter groups (see :data:`~anymodal.training.config.GROUPS`).
Everything else is frozen (``requires_grad=False``) and, because the optimiser never sees it,
stays bit-identical. Signal-token rows train without touching the rest of the embedding
matrices: as a small delta added by forward hooks (stages 1-2, folded in at the end), or as
peft's ``trainable_token_indices`` next to LoRA (stage 3).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from anymodal.config import LoraConfig
from anymodal.modality import Modality
from anymodal.model import AnyModalModel
from anymodal.utils import peft_quietly

from .config import TrainingConfig
from .data import Batch
from .losses import ImageDenoiser, modality_losses, signal_hidden_states

logger = logging.getLogger(__name__)


class SignalTokenDelta(nn.Module):
    """Trainable offsets for the signal tokens' rows of the input embedding and the LM head.

    The base matrices stay frozen (and bit-identical); forward hooks add the offsets. ``fold``
    writes them into the base rows and removes the hooks.
    """

    def __init__(self, language_model: nn.Module, token_ids: list[int]):
        super().__init__()
        emb = language_model.get_input_embeddings()
        head = language_model.get_output_embeddings()
        vocab, dim = emb.weight.shape
        ids = torch.tensor(sorted(token_ids), dtype=torch.long)
        lookup = torch.full((vocab,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("lookup", lookup, persistent=False)
        self.delta_in = nn.Parameter(torch.zeros(len(ids), dim, dtype=emb.weight.dtype))
        self.tied = head is None or head.weight is emb.weight
        self.delta_out = None if self.tied else nn.Parameter(torch.zeros(len(ids), dim, dtype=head.weight.dtype))
        self._emb, self._head = emb, head
        self._handles = [emb.register_forward_hook(self._embed_hook)]
        if head is not None:
            self._handles.append(head.register_forward_hook(self._head_hook))

    def _embed_hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        idx = self.lookup[args[0]]
        hit = (idx >= 0).unsqueeze(-1)
        return out + (self.delta_in[idx.clamp(min=0)] * hit).to(out.dtype)

    def _head_hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        delta = self.delta_in if self.tied else self.delta_out
        extra = args[0].to(delta.dtype) @ delta.t()
        return out.index_add(out.ndim - 1, self.token_ids, extra.to(out.dtype))

    @torch.no_grad()
    def fold(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._emb.weight[self.token_ids] += self.delta_in.to(self._emb.weight.dtype)
        if not self.tied:
            self._head.weight[self.token_ids] += self.delta_out.to(self._head.weight.dtype)


class StageModule(nn.Module):
    """One training stage's forward pass: media features in, all losses out.

    Wrapping the whole computation in one module lets accelerate (DDP/FSDP) see a single
    forward call per step.
    """

    def __init__(self, model: AnyModalModel, config: TrainingConfig, signal_delta: SignalTokenDelta | None,
                 denoisers: dict[Modality, ImageDenoiser]):
        super().__init__()
        self.model = model
        self.config = config
        self.signal_delta = signal_delta
        self.denoisers = nn.ModuleDict({m.value: d for m, d in denoisers.items()})

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, model = self.config, self.model
        if batch.size == 0:  # every row of this batch was bad: a zero loss keeps processes in step
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return {"loss": zero}
        features = {m: model.encode_media(m, x) for m, x in batch.media.items()}
        outputs = set(batch.target_mask) if cfg.align_weight > 0 else set()
        outputs |= set(batch.denoise) if cfg.denoise_weight > 0 else set()
        out = model(batch.input_ids, batch.attention_mask, media=features,
                    labels=batch.labels if cfg.ce_weight > 0 else None,
                    output_hidden_states=bool(outputs), use_cache=False)
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=batch.input_ids.device)
        if cfg.ce_weight > 0:
            losses["ce"] = out.loss
            total = total + cfg.ce_weight * out.loss
        for m in sorted(outputs, key=lambda x: x.value):
            hidden = signal_hidden_states(out.hidden_states[model.signal_layer(m)], batch.input_ids,
                                          model.signal_ids[m])
            cond = model.project_signal(m, hidden)
            align = modality_losses(cond, batch.targets.get(m), batch.target_mask.get(m))
            if align is not None and cfg.align_weight > 0:
                losses[f"align/{m.value}"] = align
                total = total + cfg.align_weight * align
            if m in batch.denoise and cfg.denoise_weight > 0:
                rows = batch.denoise_index[m]
                d = self.denoisers[m.value]({k: v[rows] for k, v in cond.items()}, batch.denoise[m])
                losses[f"denoise/{m.value}"] = d
                total = total + cfg.denoise_weight * d
        losses["loss"] = total
        return losses


# ============================================================================ parameter selection
def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name.rsplit(".", 1)[-1]
    raise ValueError("cannot find the embedding module in the language model")


def apply_lora(pipe: Any, training: TrainingConfig, token_ids: list[int]) -> None:
    """Wrap the LLM with a peft LoRA adapter (task CAUSAL_LM); ``token_ids`` rows train too.

    An LLM that already carries an adapter (a stage-3 output trained further) keeps it; its
    LoRA and token parameters are made trainable.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    lm = pipe.model.language_model
    if isinstance(lm, PeftModel):
        has_tokens = False
        for name, p in lm.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                p.requires_grad_(True)
                has_tokens = has_tokens or "trainable_tokens_delta" in name
        logger.info("the LLM already carries a LoRA adapter; training it further")
        if token_ids and not has_tokens:
            logger.warning("the existing adapter has no trainable token rows, so the signal-token rows stay "
                           "frozen; give LoRA settings in the training config, not llm.lora, to train them")
        return
    lc = training.lora or pipe.config.llm.lora or LoraConfig()
    kwargs: dict[str, Any] = {}
    if token_ids:
        emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
        indices = {_module_name(lm, emb): list(token_ids)}
        if head is not None and head.weight is not emb.weight:
            indices[_module_name(lm, head)] = list(token_ids)
        kwargs["trainable_token_indices"] = indices
    peft_cfg = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                              target_modules=list(lc.target_modules), task_type="CAUSAL_LM", **kwargs)
    with peft_quietly():
        pipe.model.language_model = get_peft_model(lm, peft_cfg)
    pipe.config.llm.lora = lc  # the saved index records the adapter's shape


def setup_stage(pipe: Any, training: TrainingConfig, denoisers: dict[Modality, ImageDenoiser] | None = None
                ) -> StageModule:
    """Freeze everything, unfreeze the configured groups, and wrap the model for training."""
    model: AnyModalModel = pipe.model
    groups = list(training.trainable or [])
    model.requires_grad_(False)
    signal_ids = sorted(i for ids in model.signal_ids.values() for i in ids)
    wants_tokens = "signal_tokens" in groups
    if wants_tokens and not signal_ids:
        raise ValueError("training.trainable names 'signal_tokens', but the model has no signal tokens "
                         "(it has no generators)")
    if "lora" in groups:
        apply_lora(pipe, training, signal_ids if wants_tokens else [])
    lm = model.language_model
    delta = None
    if wants_tokens and "lora" not in groups and "llm" not in groups:
        delta = SignalTokenDelta(lm, signal_ids)
    for g in groups:
        group, _, mod = g.partition(".")
        if group in ("input_projectors", "output_projectors"):
            table = getattr(model, group)
            keys = [mod] if mod else list(table)
            if not keys or any(k not in table for k in keys):
                what = "input" if group == "input_projectors" else "output"
                raise ValueError(f"training.trainable names {g!r}, but the model has no {what} projector "
                                 f"{'for ' + mod if mod else 'at all'} (it has: {', '.join(table) or 'none'})")
            for k in keys:
                table[k].requires_grad_(True)
        elif group == "encoders":
            model.encoders.requires_grad_(True)
        elif group == "llm":
            lm.requires_grad_(True)
    stage = StageModule(model, training, delta, denoisers or {})
    set_modes(stage, training)
    if not any(p.requires_grad for p in stage.parameters()):
        raise ValueError(f"training.trainable {groups} selects no parameters in this model")
    if training.gradient_checkpointing or model.config.llm.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return stage


def set_modes(stage: StageModule, training: TrainingConfig) -> None:
    """Frozen modules in eval mode (no dropout, no statistics updates); trained ones in train mode."""
    stage.eval()
    model = stage.model
    for group in ("input_projectors", "output_projectors"):
        for mod in getattr(model, group).values():
            if any(p.requires_grad for p in mod.parameters()):
                mod.train()
    groups = set(g.partition(".")[0] for g in training.trainable or [])
    if "encoders" in groups:
        model.encoders.train()
    if groups & {"lora", "llm"} or training.gradient_checkpointing:
        # HF models checkpoint activations only in train mode; the frozen LLM has no dropout to worry about
        model.language_model.train()


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]
