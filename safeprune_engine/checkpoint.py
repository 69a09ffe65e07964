"""Checkpoints of a training run: everything needed to continue bit-for-bit, and nothing pickled.

Layout of <out>/checkpoints/step-00000100/:
  student/            the student UNet (save_pretrained, safetensors + config with its pruned widths)
  projections.safetensors   feature-KD projections (when any)
  state.pt            optimizer / solver / sampler / RNG state: tensors and plain containers only, read
                      back with torch.load(weights_only=True)
  trainer_state.json  step, run identity, teacher fingerprint, student architecture
A checkpoint is written to a temporary folder and renamed into place, so an interrupted save never leaves a
checkpoint that looks complete.

Snapshots (--snapshot-steps) are the student's weights alone, <out>/snapshots/step-00000100/ (save_pretrained:
config.json + safetensors, a unet folder a pipeline can take), written the same way and never removed by
--keep-checkpoints.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import SafepruneError

STATE_FORMAT = 1


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(out_dir: str | Path, resume: str) -> Path:
    """'latest' -> newest complete checkpoint of this run; anything else is a checkpoint directory."""
    if resume == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            raise SafepruneError(f"--resume latest: no checkpoint in {checkpoint_root(out_dir)}")
        return found[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise SafepruneError(f"--resume {resume}: not a checkpoint directory (no trainer_state.json)")
    return path


def save_checkpoint(out_dir: str | Path, step: int, student, projections, state: dict, meta: dict,
                    keep: int) -> Path:
    from safetensors.torch import save_file

    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    student.save_pretrained(tmp / "student", safe_serialization=True)
    if projections is not None and len(list(projections.parameters())):
        save_file({k: v.detach().cpu().contiguous() for k, v in projections.state_dict().items()},
                  tmp / "projections.safetensors")
    torch.save(state, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**meta, "step": step, "format": STATE_FORMAT}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def snapshot_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "snapshots"


def snapshot_path(out_dir: str | Path, step: int) -> Path:
    return snapshot_root(out_dir) / f"step-{step:08d}"


def list_snapshots(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's complete snapshots, by step."""
    root = snapshot_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(p.name.split("-")[1]), p) for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / "config.json").is_file()]
    return sorted(found)


def save_snapshot(out_dir: str | Path, step: int, student) -> Path:
    """The student's weights at `step` (save_pretrained, safetensors) in snapshot_path(out_dir, step)."""
    final = snapshot_path(out_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)  # the same step run again after a resume: the same weights
    tmp.rename(final)
    return final


def load_checkpoint_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_checkpoint_state(path: str | Path, device) -> dict:
    return torch.load(Path(path) / "state.pt", map_location=device, weights_only=True)


def load_projections(path: str | Path, projections) -> None:
    from safetensors.torch import load_file

    file = Path(path) / "projections.safetensors"
    if projections is not None and file.is_file():
        projections.load_state_dict(load_file(file))
