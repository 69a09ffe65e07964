"""The shared-teacher training step machinery that every solver runs on.

Per step the teacher runs ONCE, over every row the step needs that has no stored prediction: the data rows (output
and feature distillation) and, on upper steps with live concept targets, the concept rows under every condition the
objective asks for (ESD: concept and anchor; with --preserve prompts also "preserve"), concatenated along the batch.
With cached concept targets (the default) the teacher's predictions on a fixed concept pool are computed once
before training (cache_concept_targets), and upper steps run no concept rows through the teacher at all.
Hooks keep only the data rows' block outputs, as copies when the batch holds other rows. The student runs once on
the data rows and, on upper steps, once on the concept rows (with the preserve rows in the same batch), so that a
restricted parameter set (ESD-x/-u, SalUn's mask) receives only its own share of the upper gradient; solvers drop
every lower-level tensor (teacher features, taps, predictions) before that upper forward.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..distill.features import BlockTaps
from ..models.conditioning import ConditionLayout
from ..distill.losses import (FeatureProjections, diffusion_loss, distillation_losses, feature_kd_loss,
                              output_kd_loss)
from ..unlearn.base import ConceptBatch, UnlearnObjective

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DataBatch:
    """Noisy data latents for the lower level. latents: (B, C, h, w); timesteps: (B,); text_emb: (B, L, D);
    target: (B, C, h, w) the noise or the velocity, by the teacher's prediction type."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    text_emb: torch.Tensor
    target: torch.Tensor


@dataclass
class TeacherOutputs:
    data_prediction: torch.Tensor | None = None  # (B, C, h, w)
    data_features: list[torch.Tensor] = field(default_factory=list)  # block outputs of the data rows
    concept_predictions: dict[str, torch.Tensor] = field(default_factory=dict)  # condition -> (Bc, C, h, w)

    def release_data(self) -> None:
        """Drop the lower level's tensors (what the upper loss does not read), so the upper forward runs without
        them resident."""
        self.data_prediction = None
        self.data_features = []


@dataclass
class LowerModel:
    """A model trained on L_ft alone (the bilevel solver's value model): its module, the taps on its blocks and its
    own feature projections."""

    module: nn.Module
    taps: BlockTaps
    projections: FeatureProjections | None = None

    def parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        return params + (list(self.projections.parameters()) if self.projections is not None else [])


@dataclass
class LowerLoss:
    total: torch.Tensor
    parts: dict[str, torch.Tensor]


class EpochSampler:
    """Indices in shuffled epochs, drawn from the run's generator; its state is two small tensors."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.generator = size, generator
        self.order = torch.randperm(size, generator=generator, device=generator.device)
        self.cursor = 0

    def take(self, count: int) -> torch.Tensor:
        chunks = []
        while count > 0:
            if self.cursor >= self.size:
                self.order = torch.randperm(self.size, generator=self.generator, device=self.generator.device)
                self.cursor = 0
            chunk = self.order[self.cursor : self.cursor + count]
            self.cursor += chunk.numel()
            count -= chunk.numel()
            chunks.append(chunk)
        return torch.cat(chunks)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"order": self.order.cpu(), "cursor": torch.tensor(self.cursor)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.order = state["order"].to(self.order.device)
        self.cursor = int(state["cursor"])


class TrainingEngine:
    """Holds the student, the teacher and the data; solvers call its sample / teacher_pass / loss methods."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        noise_scheduler,
        prediction_type: str,
        data_cache,
        config,
        concept_source=None,
        objective: UnlearnObjective | None = None,
        projections: FeatureProjections | None = None,
        device: torch.device | str = "cpu",
        prompts=None,
        feature_pairs: list[tuple[str, str]] | None = None,
        kernel_patches: list | None = None,
        empty_text_emb: torch.Tensor | None = None,
    ):
        """prompts: the encoded ConceptPrompts (objectives that work from text alone, e.g. UCE, read them);
        feature_pairs: (student block, teacher block) names to distil features between (default: every block,
        by position); kernel_patches: (unet, PatchRecord) of the fused ops put into the student and teacher
        (--kernels), which the run undoes before it hands the models back; empty_text_emb: (1, L, D) embedding of the
        empty caption, which --caption-dropout puts in place of a row's caption."""
        self.device = torch.device(device)
        self.student, self.teacher = student, teacher
        # one condition tensor per row; SDXL's added conditioning is split off at each UNet call (the student keeps
        # the teacher's text and added-embedding layers, so one layout serves both)
        self.condition = ConditionLayout.of(student)
        self.scheduler, self.prediction_type = noise_scheduler, prediction_type
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(self.device)
        self.data, self.concepts, self.objective = data_cache, concept_source, objective
        self.config = config
        self.projections = projections
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = EpochSampler(len(data_cache), self.generator)
        self.prompts = prompts
        self.kernel_patches = list(kernel_patches or [])
        self.caption_dropout = float(getattr(config, "caption_dropout", 0.0))
        if self.caption_dropout > 0 and empty_text_emb is None:
            raise ValueError("caption_dropout > 0 needs the empty caption's embedding (empty_text_emb)")
        self.empty_text_emb = (None if empty_text_emb is None
                               else empty_text_emb.to(self.device, data_cache.text_emb.dtype))
        self.student_taps = BlockTaps(student, None if feature_pairs is None else [s for s, _ in feature_pairs])
        self.teacher_taps = BlockTaps(teacher, None if feature_pairs is None else [t for _, t in feature_pairs])
        mp = config.mixed_precision
        self.autocast_dtype = AUTOCAST_DTYPES.get(mp)
        if objective is not None:
            objective.bind(self)

    @property
    def preserve_active(self) -> bool:
        """Preserve prompts (--preserve, --preserve-from-data) hold the student's outputs to the teacher's on the
        concept latents."""
        preserve = self.prompts.preserve if self.prompts is not None else getattr(self.config, "preserve", None)
        return (self.objective is not None and self.objective.latents is not None
                and bool(preserve) and getattr(self.config, "preserve_weight", 0) > 0)

    @property
    def teacher_conditions(self) -> tuple[str, ...]:
        """Every condition the teacher must predict on the concept rows: the objective's, plus "preserve"."""
        names = tuple(self.objective.teacher_conditions) if self.objective is not None else ()
        if self.preserve_active and "preserve" not in names:
            names += ("preserve",)
        return names

    # ---- sampling ----------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def sample_data_batch(self) -> DataBatch:
        batch_size = self.config.batch_size
        index = self.sampler.take(batch_size)
        z0 = self.data.sample_latents(index, self.generator)
        noise = torch.randn(z0.shape, generator=self.generator, device=self.device, dtype=z0.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,), generator=self.generator,
                          device=self.device)
        z_t = self.scheduler.add_noise(z0, noise, t)
        target = self.scheduler.get_velocity(z0, noise, t) if self.prediction_type == "v_prediction" else noise
        text_emb = self.drop_captions(self.data.text_emb[index], self.generator)
        return DataBatch(latents=z_t, timesteps=t, text_emb=text_emb, target=target)

    def drop_captions(self, text_emb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """--caption-dropout: each row's caption replaced by the empty one with that probability (no draw at 0, so
        runs without it keep their random stream)."""
        if self.caption_dropout <= 0:
            return text_emb
        dropped = torch.rand(text_emb.shape[0], generator=generator, device=self.device) < self.caption_dropout
        return self.condition.drop_text(text_emb, self.empty_text_emb, dropped)

    def probe_batches(self, rows: int, seed: int) -> list[DataBatch]:
        """A fixed set of `rows` noised data rows, in batches of at most batch_size, for measuring L_ft the same way
        at every check: drawn from its own generator (the run's draws are unchanged), with timesteps spread evenly
        over the schedule (the diffusion loss varies by an order of magnitude with the timestep, so a random draw of
        timesteps would move the measured loss more than the models do)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        index = torch.randperm(len(self.data), generator=generator, device=self.device)[:rows]
        if index.numel() < rows:  # a data set smaller than the probe: reuse images under other noise and timesteps
            index = index.repeat((rows + index.numel() - 1) // index.numel())[:rows]
        total = self.scheduler.config.num_train_timesteps
        timesteps = ((torch.arange(rows, device=self.device) + 0.5) * total / rows).long().clamp_(max=total - 1)
        batches = []
        for start in range(0, rows, self.config.batch_size):
            part, t = index[start:start + self.config.batch_size], timesteps[start:start + self.config.batch_size]
            z0 = self.data.sample_latents(part, generator)
            noise = torch.randn(z0.shape, generator=generator, device=self.device, dtype=z0.dtype)
            target = self.scheduler.get_velocity(z0, noise, t) if self.prediction_type == "v_prediction" else noise
            batches.append(DataBatch(latents=self.scheduler.add_noise(z0, noise, t), timesteps=t,
                                     text_emb=self.drop_captions(self.data.text_emb[part], generator),
                                     target=target))
        return batches

    def sample_concept_batch(self) -> ConceptBatch | None:
        """A concept batch, or None for an objective that needs no latents (UCE works from text embeddings)."""
        if self.objective is not None and self.objective.latents is None:
            return None
        if self.concepts is None:
            raise RuntimeError("this run has no concept source (no --erase given)")
        return self.concepts.sample(self.config.effective_concept_batch_size, self.generator)

    # ---- the one teacher forward -------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: its tensors could not be saved for the losses' backward
    def teacher_pass(self, data: DataBatch | None, concept: ConceptBatch | None, features: bool = True,
                     model: nn.Module | None = None) -> TeacherOutputs:
        """One batched forward of the frozen model over every row this step needs.

        Rows: [data (B) | concept under each objective condition (Bc each)]. Only the data rows' block
        outputs are kept, and only when `features` is set and the model is the teacher (whose blocks are tapped).
        model: the frozen model to run (default the teacher; two-stage passes its frozen copy of the student).
        """
        model = self.teacher if model is None else model
        stored = (concept.teacher_predictions if concept is not None and model is self.teacher else None)
        latents, timesteps, conditions, sizes = [], [], [], []
        if data is not None:
            latents.append(data.latents), timesteps.append(data.timesteps), conditions.append(data.text_emb)
            sizes.append(("data", data.latents.shape[0]))
        if concept is not None and stored is None:
            for name in self.teacher_conditions:
                latents.append(concept.latents), timesteps.append(concept.timesteps)
                conditions.append(concept.conditions[name])
                sizes.append((name, concept.latents.shape[0]))
        outputs = TeacherOutputs(concept_predictions=dict(stored) if stored is not None else {})
        if not latents:
            return outputs
        dtype = next(model.parameters()).dtype
        keep_features = features and data is not None and model is self.teacher
        # a slice of the batched output would keep every row alive: copy the data rows when there are others
        rows = slice(0, data.latents.shape[0]) if keep_features and len(sizes) > 1 else None
        capture = self.teacher_taps.capture(rows=rows, detach=True, copy=True) if keep_features else nullcontext([])
        with capture as feature_maps, self.autocast():
            prediction = model(
                torch.cat(latents).to(dtype), torch.cat(timesteps), **self.condition.kwargs(torch.cat(conditions).to(dtype))
            ).sample
        outputs.data_features = list(feature_maps) if keep_features else []
        chunks = prediction.split([s for _, s in sizes])
        for (name, _), chunk in zip(sizes, chunks):
            # views of one batched output keep all of it alive: each loss gets its own rows
            chunk = chunk.clone() if len(sizes) > 1 else chunk
            if name == "data":
                outputs.data_prediction = chunk
            else:
                outputs.concept_predictions[name] = chunk
        return outputs

    @torch.no_grad()
    def cache_concept_targets(self, rows: int, chunk: int | None = None, progress: bool = False) -> None:
        """Compute the teacher's predictions once for a fixed pool of concept rows (every row of a trajectory pool,
        else `rows` fixed noised draws) and sample upper batches from that pool from now on, so that upper steps
        run no concept rows through the teacher. Uses its own generator: the run's draws are unchanged."""
        from tqdm.auto import tqdm

        from ..unlearn.sources import CachedTargetSource, pool_batches

        if self.objective is None or self.objective.latents is None or self.concepts is None:
            return
        if not self.teacher_conditions:  # e.g. noise-based Concept Ablation: nothing to compute
            return
        # rows per teacher forward: a no-grad pass, so larger than a training batch costs only transient memory
        chunk = chunk or max(self.config.effective_concept_batch_size, 16)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed + 1)
        batches = pool_batches(self.concepts, rows, chunk, generator)
        predictions: dict[str, list[torch.Tensor]] = {name: [] for name in self.teacher_conditions}
        for batch in tqdm(batches, desc="teacher targets of the concept pool", disable=not progress):
            outputs = self.teacher_pass(None, batch, features=False)
            for name in predictions:
                predictions[name].append(outputs.concept_predictions[name])
        self.concepts = CachedTargetSource(batches, {k: torch.cat(v) for k, v in predictions.items()})

    # ---- losses ------------------------------------------------------------------------------------
    def lower_loss(self, data: DataBatch, teacher: TeacherOutputs, runner: nn.Module | None = None,
                   model: LowerModel | None = None) -> LowerLoss:
        """L_ft = w_diff L_diff + w_out L_out + w_feat L_feat on the data rows (student forward inside).

        runner: what runs the student's forward (default the student; a ZeRO solver passes its DeepSpeed engine,
        which wraps the same module, so the taps on the student's blocks still fire). model: another model trained
        on L_ft (the value model, see make_value_model) instead of the student."""
        taps = self.student_taps if model is None else model.taps
        capture = taps.capture() if self.needs_features else nullcontext([])
        student = model.module if model is not None else self.student if runner is None else runner
        with capture as student_maps, self.autocast():
            prediction = student(data.latents, data.timesteps, **self.condition.kwargs(data.text_emb)).sample
        projections = self.projections if model is None else model.projections
        return self.lower_loss_from(prediction, list(student_maps), data, teacher, projections)

    def make_value_model(self) -> LowerModel:
        """A trainable copy of the student (and its feature projections) for estimating min L_ft: it starts where the
        student starts and is trained on L_ft only, on the same batches and teacher outputs."""
        module = copy.deepcopy(self.student)
        self.student_taps.strip_copied_hooks(module)
        projections = copy.deepcopy(self.projections) if self.projections is not None else None
        return LowerModel(module, BlockTaps(module, self.student_taps.names), projections)

    @property
    def needs_features(self) -> bool:
        return self.config.w_feat > 0 and bool(self.student_taps.names)

    def lower_loss_from(self, prediction: torch.Tensor, student_maps: list[torch.Tensor], data: DataBatch,
                        teacher: TeacherOutputs, projections: FeatureProjections | None = None) -> LowerLoss:
        """L_ft from the student's prediction on the data rows and its tapped block outputs there (projections:
        the feature projections to use, default the engine's)."""
        projections = self.projections if projections is None else projections
        cfg = self.config
        need_features = self.needs_features
        parts = {"diff": diffusion_loss(prediction, data.target, data.timesteps, self.alphas_cumprod, cfg.snr_gamma,
                                        self.prediction_type)}
        teacher_maps = teacher.data_features if need_features else []
        student_maps = student_maps if need_features else []
        if cfg.kernels == "off":  # eager torch, one loss call per pair
            parts["out"] = output_kd_loss(prediction, teacher.data_prediction)
            distill = cfg.w_out * parts["out"]
            if need_features:
                parts["feat"] = feature_kd_loss(student_maps, teacher_maps, projections)
                distill = distill + cfg.w_feat * parts["feat"]
        else:  # the output and every feature pair in one fused distill_loss call
            distill, distill_parts = distillation_losses(
                prediction, teacher.data_prediction, student_maps, teacher_maps, projections, cfg.w_out,
                cfg.w_feat if need_features else 0.0, backend=cfg.kernels)
            parts.update(distill_parts)
        total = cfg.w_diff * parts["diff"] + distill
        return LowerLoss(total=total, parts=parts)

    def upper_rows(self, concept: ConceptBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, timesteps, condition) the student runs for the upper loss: the concept rows under the concept
        condition, and with --preserve the same latents again under the preserve prompts."""
        latents, timesteps, condition = concept.latents, concept.timesteps, concept.conditions["concept"]
        if self.preserve_active:
            latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
            condition = torch.cat([condition, concept.conditions["preserve"]])
        return latents, timesteps, condition

    def upper_loss(self, concept: ConceptBatch | None, teacher: TeacherOutputs,
                   runner: nn.Module | None = None) -> torch.Tensor:
        """L_cu: the objective's loss on the student's prediction under the concept condition, plus
        preserve_weight * MSE(student, teacher) under the preserve prompts when --preserve is given.
        teacher: the frozen model's outputs (two-stage: its frozen student copy's); runner: as in lower_loss."""
        objective = self.objective
        if objective.latents is None:  # a weight-space objective (UCE): no student forward
            return objective.loss(None, teacher.concept_predictions, concept)
        with self.autocast():
            prediction = self.student_forward(*self.upper_rows(concept), objective.gradient_masks(), runner)
        return self.upper_loss_from(prediction, concept, teacher)

    def upper_loss_from(self, prediction: torch.Tensor, concept: ConceptBatch, teacher: TeacherOutputs):
        """L_cu from the student's prediction on upper_rows(concept)."""
        rows = concept.latents.shape[0]
        loss = self.objective.loss(prediction[:rows], teacher.concept_predictions, concept)
        if self.preserve_active:
            held = F.mse_loss(prediction[rows:].float(), teacher.concept_predictions["preserve"].float())
            loss = loss + self.config.preserve_weight * held
        return loss

    @property
    def joint_forward_possible(self) -> bool:
        """Whether one student forward can serve both levels: the upper level trains the whole student (no
        restricted parameter set or mask whose share of the gradient must stay separate) and works on latents."""
        objective = self.objective
        if objective is None or objective.latents is None or objective.gradient_masks():
            return False
        return all(objective.trainable(name) for name, p in self.student.named_parameters() if p.requires_grad)

    def joint_losses(self, data: DataBatch, concept: ConceptBatch, teacher: TeacherOutputs,
                     runner: nn.Module | None = None) -> tuple[LowerLoss, torch.Tensor]:
        """(L_ft, L_cu) from ONE student forward over [data rows | upper rows]: at a small per-device batch one
        larger forward and backward uses the device better than two (see joint_forward_possible for when the
        gradients are the same as two separate passes)."""
        rows = data.latents.shape[0]
        latents, timesteps, condition = self.upper_rows(concept)
        if condition.shape[1:] != data.text_emb.shape[1:]:
            raise ValueError(f"joint forward: data text embeddings {tuple(data.text_emb.shape[1:])} and concept "
                             f"conditions {tuple(condition.shape[1:])} differ in shape")
        capture = self.student_taps.capture(rows=slice(0, rows)) if self.needs_features else nullcontext([])
        student = self.student if runner is None else runner
        with capture as student_maps, self.autocast():
            prediction = student(torch.cat([data.latents, latents.to(data.latents.dtype)]),
                                 torch.cat([data.timesteps, timesteps]),
                                 **self.condition.kwargs(torch.cat([data.text_emb, condition.to(data.text_emb.dtype)]))
                                 ).sample
        lower = self.lower_loss_from(prediction[:rows], list(student_maps), data, teacher)
        return lower, self.upper_loss_from(prediction[rows:], concept, teacher)

    def student_forward(self, latents, timesteps, condition, masks: dict[str, torch.Tensor] | None = None,
                        runner: nn.Module | None = None):
        """The student's prediction; with masks (name -> bool tensor), gradients reach only the masked elements
        of those parameters (same forward values: w = where(mask, w, sg(w))). runner: as in lower_loss."""
        student = self.student if runner is None else runner
        if not masks:
            return student(latents, timesteps, **self.condition.kwargs(condition)).sample
        params = dict(student.named_parameters())
        restricted = {name: torch.where(mask, params[name], params[name].detach()) for name, mask in masks.items()}
        return torch.func.functional_call(student, restricted, (latents, timesteps),
                                          self.condition.kwargs(condition)).sample

    # ---- parameter sets ----------------------------------------------------------------------------
    def lower_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.projections is not None:
            params += list(self.projections.parameters())
        return params

    def upper_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.student.named_parameters()
                if p.requires_grad and self.objective.trainable(name)]


def accumulate_gradients(loss: torch.Tensor, params: list[nn.Parameter], scale: float = 1.0) -> None:
    """Add scale * d loss / d params into each param's .grad, touching no other parameter.

    Used for the upper level so that a restricted parameter set (ESD-x: attn2 only) gets its gradient while
    the rest of the student receives none from that loss. backward(inputs=...) accumulates in place: no
    per-parameter gradient copies, and parameters the loss does not reach keep their .grad untouched.
    """
    params = list(params)
    if params:  # backward(inputs=[]) is an error; an objective with nothing to train contributes nothing
        (loss * scale if scale != 1.0 else loss).backward(inputs=params)
