"""The shared-teacher step on many ranks: each rank computes its share of the global batch, and every loss value
the solvers see is the global one.

Data sharding: every rank draws the *global* batch from the same generator (same seed, same state), so indices,
noise and timesteps are exactly those of a single-process run, and keeps its contiguous block of rows. The random
draws are a few small tensors; the UNet forwards, the teacher pass and the backward run on the rank's rows only.
That makes a run with N ranks a single-process run of the same global batch (up to reduction order), and lets a
checkpoint resume on another rank count.

Loss values: each rank's loss is the mean over its rows; gradients are averaged over ranks by DeepSpeed (or by the
data-parallel solver), which gives the gradient of the global mean. The loss tensors handed to the solvers carry
the global mean as their value (all-reduced) and the local loss as their gradient (value = g + (l - sg(l))), so the
bilevel value-function tracking, logging and NaN checks see the same numbers on every rank.
"""
from __future__ import annotations

import dataclasses

import torch

from ..bilevel.engine import LowerLoss, TrainingEngine


def with_value(loss: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A tensor whose value is `value` (exactly) and whose gradient is that of `loss`."""
    return value.to(loss.dtype).detach() + (loss - loss.detach())


def take_rows(batch, rows: slice, total: int):
    """The batch dataclass with every per-row tensor (first dimension == total, also inside dicts) cut to rows."""
    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
            return value[rows]
        if isinstance(value, dict):
            return {key: cut(item) for key, item in value.items()}
        return value

    return dataclasses.replace(batch, **{f.name: cut(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


class DistributedTrainingEngine(TrainingEngine):
    """TrainingEngine whose batches are this rank's rows and whose loss values are global means.

    context: the DistContext. restrict_upper_forward (ZeRO): upper forwards build their graph only to the upper
    parameters, since DeepSpeed's backward reaches whatever the graph reaches. The ZeRO solver passes its DeepSpeed
    engine as the `runner` of the loss calls, so that DeepSpeed sees the student's forwards (ZeRO-3 gathers weights
    in them; ZeRO's backward hooks hang off their outputs); parameter lists and names keep coming from the plain
    module in `student`.
    """

    def __init__(self, *args, context, restrict_upper_forward: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.context = context
        self.restrict_upper_forward = restrict_upper_forward
        self._frozen: list = []

    # ---- this rank's rows ---------------------------------------------------------------------------------------
    def sample_data_batch(self):
        batch = super().sample_data_batch()  # the global batch: same draws on every rank
        total = batch.latents.shape[0]
        return self.memory_format(take_rows(batch, self.context.rows(total), total))

    def sample_concept_batch(self):
        batch = super().sample_concept_batch()
        if batch is None:
            return None
        total = batch.latents.shape[0]
        return self.memory_format(take_rows(batch, self.context.rows(total), total))

    def memory_format(self, batch):
        """--channels-last: NHWC latents, so the convolutions run channels-last even where ZeRO keeps the
        weights in the default layout (a convolution follows its input's format)."""
        if not getattr(self.config, "channels_last", False):
            return batch
        return dataclasses.replace(batch, latents=batch.latents.contiguous(memory_format=torch.channels_last))

    # ---- global loss values; the upper forward's graph -----------------------------------------------------------
    def freeze_outside_upper(self) -> None:
        """Until release_upper_freeze(), parameters outside upper_parameters() do not require grad, so the upper
        forward's graph (and, with gradient checkpointing, its recomputation in backward) reaches exactly the
        parameters the single-process accumulate_gradients touches."""
        self.release_upper_freeze()
        upper = {id(p) for p in self.upper_parameters()}
        self._frozen = [p for p in self.lower_parameters() if id(p) not in upper and p.requires_grad]
        for param in self._frozen:
            param.requires_grad_(False)

    def release_upper_freeze(self) -> None:
        for param in getattr(self, "_frozen", []):
            param.requires_grad_(True)
        self._frozen = []

    def probe_batches(self, rows: int, seed: int):
        """This rank's rows of the constraint form's probe set (the same global rows as one process)."""
        batches = []
        for batch in super().probe_batches(rows, seed):
            total = batch.latents.shape[0]
            batches.append(self.memory_format(take_rows(batch, self.context.rows(total), total)))
        return batches

    def lower_loss(self, data, teacher, runner=None, model=None) -> LowerLoss:
        self.release_upper_freeze()  # an upper forward whose backward never came must not starve this one
        loss = super().lower_loss(data, teacher, runner, model)
        names = list(loss.parts)
        local = torch.stack([loss.total.detach().float()] + [loss.parts[n].detach().float() for n in names])
        global_values = self.context.mean(local)
        return LowerLoss(total=with_value(loss.total, global_values[0]),
                         parts={n: with_value(loss.parts[n], global_values[i + 1]) for i, n in enumerate(names)})

    def upper_loss(self, concept, teacher, runner=None) -> torch.Tensor:
        if self.restrict_upper_forward:
            self.freeze_outside_upper()  # released by the solver once the upper backward is done
        loss = super().upper_loss(concept, teacher, runner)
        return with_value(loss, self.context.mean(loss.detach().float().reshape(1))[0])
