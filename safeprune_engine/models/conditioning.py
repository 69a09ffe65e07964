"""A UNet's text conditioning as one tensor per row, for SD 1.x/2.x and SDXL alike.

SD 1.x/2.x condition their UNet on the text encoder's hidden states, ``(B, L, D)``. SDXL's UNet also takes added
conditioning on every forward: the second text encoder's pooled embedding ``text_embeds (B, P)`` and six
``time_ids (B, 6)`` (original height and width, crop top and left, target height and width, in pixels).

Everything that carries conditioning through a run (the latent cache, concept prompts, anchors, caption dropout,
the teacher's one batched pass over data and concept rows, ZeRO broadcasts) handles one tensor per row. So an SDXL
condition is packed: its pooled embedding and time ids ride as ``k = ceil((P + 6) / D)`` extra, zero-padded rows
after the ``L`` token rows, ``(B, L + k, D)``, and :class:`ConditionLayout` splits them again at the UNet call.
Indexing, ``torch.cat`` and dtype casts then work unchanged; the time ids are cast with the hidden states, as
diffusers' SDXL pipeline does (pixel sizes are exact in fp16 and bf16 up to 2048 when they are multiples of 8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import SafepruneError

TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)


def unet_config(unet) -> dict:
    """The diffusers config of a UNet, or of the UNet a wrapper (DeepSpeed engine, DDP) holds as ``.module``."""
    module = unet
    while not hasattr(module, "config") and hasattr(module, "module"):
        module = module.module
    config = getattr(module, "config", None)
    if config is None:
        raise SafepruneError(f"{type(unet).__name__} has no diffusers config; expected a UNet2DConditionModel")
    return dict(config)


@dataclass(frozen=True)
class ConditionLayout:
    """How a UNet's condition tensor is laid out: ``width`` D (cross-attention dim), and for SDXL-style UNets the
    pooled embedding's size ``pooled`` P (0 for SD 1.x/2.x, which take no added conditioning)."""

    width: int
    pooled: int = 0

    @classmethod
    def of(cls, unet) -> "ConditionLayout":
        return cls.from_config(unet_config(unet))

    @classmethod
    def from_config(cls, config: dict) -> "ConditionLayout":
        width = config.get("cross_attention_dim")
        if isinstance(width, (list, tuple)):
            if len(set(width)) != 1:
                raise SafepruneError(f"per-block cross_attention_dim {list(width)} is not supported")
            width = width[0]
        kind = config.get("addition_embed_type")
        if kind is None:
            return cls(int(width))
        if kind != "text_time":
            raise SafepruneError(f"UNet addition_embed_type {kind!r} is not supported (SDXL's is 'text_time')")
        total = config.get("projection_class_embeddings_input_dim")
        time_dim = config.get("addition_time_embed_dim")
        if not total or not time_dim or total <= TIME_IDS * time_dim:
            raise SafepruneError("SDXL-style UNet config needs projection_class_embeddings_input_dim > 6 x "
                                 f"addition_time_embed_dim (got {total} and {time_dim})")
        return cls(int(width), int(total - TIME_IDS * time_dim))

    @property
    def added(self) -> bool:
        """Whether the UNet takes added conditioning (pooled text embedding and time ids)."""
        return self.pooled > 0

    @property
    def extra_rows(self) -> int:
        """Rows the added conditioning takes after the token rows (0 without it)."""
        return math.ceil((self.pooled + TIME_IDS) / self.width) if self.added else 0

    def pack(self, hidden: torch.Tensor, pooled: torch.Tensor | None = None,
             time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L, D)`` hidden states (+ ``(B, P)`` pooled, ``(B, 6)`` time ids) -> the condition tensor."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.width:
            raise SafepruneError(f"hidden states {tuple(hidden.shape)}: expected (B, L, {self.width})")
        if not self.added:
            if pooled is not None or time_ids is not None:
                raise SafepruneError("this UNet takes no added conditioning (pooled embedding, time ids)")
            return hidden
        batch = hidden.shape[0]
        if pooled is None or time_ids is None:
            raise SafepruneError("an SDXL-style UNet needs the pooled text embedding and the time ids")
        if tuple(pooled.shape) != (batch, self.pooled) or tuple(time_ids.shape) != (batch, TIME_IDS):
            raise SafepruneError(f"pooled {tuple(pooled.shape)} and time ids {tuple(time_ids.shape)}: expected "
                                 f"({batch}, {self.pooled}) and ({batch}, {TIME_IDS})")
        flat = hidden.new_zeros(batch, self.extra_rows * self.width)
        flat[:, : self.pooled] = pooled.to(hidden.dtype)
        flat[:, self.pooled : self.pooled + TIME_IDS] = time_ids.to(hidden.dtype)
        return torch.cat([hidden, flat.view(batch, self.extra_rows, self.width)], dim=1)

    def split(self, condition: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """The condition tensor -> (hidden states, ``added_cond_kwargs`` or None)."""
        if not self.added:
            return condition, None
        rows = self.extra_rows
        if condition.dim() != 3 or condition.shape[1] <= rows or condition.shape[-1] != self.width:
            raise SafepruneError(f"condition {tuple(condition.shape)} is not a packed SDXL condition (B, L + "
                                 f"{rows}, {self.width}); encode prompts with the SDXL teacher")
        flat = condition[:, -rows:].reshape(condition.shape[0], rows * self.width)
        added = {"text_embeds": flat[:, : self.pooled], "time_ids": flat[:, self.pooled : self.pooled + TIME_IDS]}
        return condition[:, :-rows], added

    def hidden(self, condition: torch.Tensor) -> torch.Tensor:
        """Only the token rows (what cross-attention reads): UCE's key/value inputs, caption similarity."""
        return condition[:, : condition.shape[1] - self.extra_rows]

    def drop_text(self, condition: torch.Tensor, empty: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """Rows of `condition` where `dropped` (B,) holds take the empty prompt's text (`empty`, (1, L + k, D)),
        keeping their own time ids: a dropped caption does not change the image's size or crop."""
        if not self.added:
            return torch.where(dropped[:, None, None], empty, condition)
        text = torch.ones(condition.shape[1:], dtype=torch.bool, device=condition.device)
        tokens = condition.shape[1] - self.extra_rows
        time_slots = text[tokens:].view(-1)[self.pooled : self.pooled + TIME_IDS]
        time_slots.fill_(False)
        return torch.where(dropped[:, None, None] & text, empty, condition)

    def kwargs(self, condition: torch.Tensor) -> dict:
        """Keyword arguments of ``unet(sample, timestep, **kwargs)`` for this condition."""
        hidden, added = self.split(condition)
        return {"encoder_hidden_states": hidden} if added is None else {
            "encoder_hidden_states": hidden, "added_cond_kwargs": added}


def unet_kwargs(unet, condition: torch.Tensor) -> dict:
    """``unet(sample, t, **unet_kwargs(unet, condition))``: the condition split as `unet` takes it."""
    return ConditionLayout.of(unet).kwargs(condition)


def time_ids(resolution: int | Sequence[int], count: int, original: Sequence[int] | None = None,
             crop: Sequence[int] = (0, 0)) -> torch.Tensor:
    """``(count, 6)`` SDXL time ids: original size (default: the target), crop top-left, target size (pixels)."""
    target = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    original = target if original is None else tuple(original)
    row = torch.tensor([*original, *crop, *target], dtype=torch.float32)
    return row.expand(count, TIME_IDS).clone()


__all__ = ["ConditionLayout", "TIME_IDS", "time_ids", "unet_config", "unet_kwargs"]
