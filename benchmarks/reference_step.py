"""A reference-style training iteration: what the paper's public code does per step, on the same diffusers models.

Written from METHOD.md's "Reference training setup" (not from the reference code itself). Per iteration:

- lower step (every iteration): VAE-encode the image batch (``vae.encode(x).latent_dist.sample() * scaling``),
  run the text encoder on the caption tokens, noise the latents, run the fp32 teacher once under ``no_grad``
  (its prediction is the output-KD target; forward hooks on every down / mid / up block keep the block outputs
  as returned, whole ``(hidden, residuals)`` tuples for down blocks, for feature KD), run the student with the
  same hooks, L_ft = w_diff * L_diff + w_out * L_out + w_feat * L_feat, backward, AdamW step (lr, all weights);
- upper step (every ``upper_every``-th iteration, after the lower step): VAE-encode a batch of concept images,
  text-encode the concept captions and the anchor text, run the teacher twice, once under the concept condition
  and once under the anchor condition, build the ESD target ``T(a) - eta * (T(c) - T(a))``, run the student under
  the concept condition, backward, step a second AdamW (lr_upper) over the ESD-u parameter set (everything but
  cross-attention attn2) of the same weights.

Everything runs in fp32; the caller turns TF32 off on CUDA. The data loader's work (PNG decoding, resizing,
tokenising) is done once up front, so the timing leaves it out (which favours this reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def block_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every down block, the mid block and every up block (9 for SD), in forward order."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    return blocks + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]


def keep_outputs(unet: nn.Module, store: dict) -> list:
    """Hooks that store each block's output exactly as returned (tuples included), always on, like the reference."""

    def make(name):
        def hook(_module, _inputs, output):
            store[name] = output

        return hook

    return [module.register_forward_hook(make(name)) for name, module in block_modules(unet)]


def fp32(module: nn.Module, device) -> nn.Module:
    """Move to `device` in fp32, casting only when needed (diffusers warns on every dtype .to, even a no-op)."""
    module.to(device)
    if any(p.dtype != torch.float32 for p in module.parameters()):
        module.to(dtype=torch.float32)
    return module


def hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class ReferenceTrainer:
    """The reference loop's state: models (fp32, on `device`), data tensors, hooks and the two AdamW optimizers.

    teacher_unet, student: UNet2DConditionModel-like (student trainable); vae: AutoencoderKL; text_encoder:
    CLIPTextModel; noise_scheduler: diffusers DDPMScheduler (add_noise / get_velocity).
    images: (N, 3, H, W) in [-1, 1]; caption_ids: (N, L) token ids; concept_images: (Nc, 3, H, W);
    concept_ids: (Nc, L); anchor_ids: (1, L) the anchor prompt's tokens ("" for ESD's empty anchor).
    """

    def __init__(self, teacher_unet, student, vae, text_encoder, noise_scheduler, prediction_type: str,
                 images, caption_ids, concept_images, concept_ids, anchor_ids, batch_size: int,
                 device, lr: float = 1e-6, lr_upper: float = 5e-6, upper_every: int = 10,
                 w_diff: float = 1.0, w_out: float = 2.0, w_feat: float = 0.1, eta: float = 1.0, seed: int = 0):
        self.device = torch.device(device)
        self.teacher = fp32(teacher_unet, self.device).eval().requires_grad_(False)
        self.student = fp32(student, self.device).train().requires_grad_(True)
        self.vae = fp32(vae, self.device).eval().requires_grad_(False)
        self.text_encoder = fp32(text_encoder, self.device).eval().requires_grad_(False)
        self.scheduler, self.prediction_type = noise_scheduler, prediction_type
        self.scaling = float(vae.config.scaling_factor)
        self.images, self.caption_ids = images.to(self.device), caption_ids.to(self.device)
        self.concept_images, self.concept_ids = concept_images.to(self.device), concept_ids.to(self.device)
        self.anchor_ids = anchor_ids.to(self.device)
        self.batch_size, self.upper_every = batch_size, upper_every
        self.w_diff, self.w_out, self.w_feat, self.eta = w_diff, w_out, w_feat, eta
        self.teacher_feats: dict = {}
        self.student_feats: dict = {}
        self.hooks = keep_outputs(self.teacher, self.teacher_feats) + keep_outputs(self.student, self.student_feats)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=lr)
        esd_u = [p for n, p in self.student.named_parameters() if ".attn2." not in n]
        self.upper_optimizer = torch.optim.AdamW(esd_u, lr=lr_upper)
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps

    # ---- per-step encoders --------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(pixels).latent_dist.sample() * self.scaling

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def noised(self, z0: torch.Tensor):
        noise = torch.randn(z0.shape, generator=self.generator, device=self.device)
        t = torch.randint(0, self.num_train_timesteps, (z0.shape[0],), generator=self.generator, device=self.device)
        return self.scheduler.add_noise(z0, noise, t), noise, t

    def pick(self, count: int) -> torch.Tensor:
        return torch.randint(0, count, (self.batch_size,), generator=self.generator, device=self.device)

    # ---- the two steps ------------------------------------------------------------------------------------
    def lower_step(self) -> float:
        index = self.pick(self.images.shape[0])
        z0 = self.encode_images(self.images[index])
        text = self.encode_text(self.caption_ids[index])
        z_t, noise, t = self.noised(z0)
        target = self.scheduler.get_velocity(z0, noise, t) if self.prediction_type == "v_prediction" else noise
        with torch.no_grad():
            teacher_pred = self.teacher(z_t, t, encoder_hidden_states=text).sample
        student_pred = self.student(z_t, t, encoder_hidden_states=text).sample
        loss_diff = F.mse_loss(student_pred, target)
        loss_out = F.mse_loss(student_pred, teacher_pred)
        loss_feat = sum(F.mse_loss(hidden(self.student_feats[name]), hidden(self.teacher_feats[name]))
                        for name in self.teacher_feats) / len(self.teacher_feats)
        loss = self.w_diff * loss_diff + self.w_out * loss_out + self.w_feat * loss_feat
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach().item()  # logged every step

    def upper_step(self) -> float:
        index = self.pick(self.concept_images.shape[0])
        z0 = self.encode_images(self.concept_images[index])
        concept = self.encode_text(self.concept_ids[index])
        anchor = self.encode_text(self.anchor_ids.repeat(self.batch_size, 1))
        z_t, _, t = self.noised(z0)
        with torch.no_grad():
            teacher_concept = self.teacher(z_t, t, encoder_hidden_states=concept).sample
            teacher_anchor = self.teacher(z_t, t, encoder_hidden_states=anchor).sample
        target = teacher_anchor - self.eta * (teacher_concept - teacher_anchor)
        student_pred = self.student(z_t, t, encoder_hidden_states=concept).sample
        loss = F.mse_loss(student_pred, target)
        self.upper_optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.upper_optimizer.step()
        return loss.detach().item()

    def step(self, iteration: int) -> dict[str, float]:
        out = {"loss/ft": self.lower_step()}
        if iteration % self.upper_every == self.upper_every - 1:
            out["loss/cu"] = self.upper_step()
        return out

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
