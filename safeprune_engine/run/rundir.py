"""What a run directory and a checkpoint may hold: refusals made before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import RunConfig
from ..errors import SafepruneError


def check_run_dir(config: RunConfig) -> None:
    """Refuse an out dir that holds a different run, or the same run with checkpoints but no --resume."""
    out = Path(config.out)
    stored_file = out / "run_config.json"
    if out.exists() and not out.is_dir():
        raise SafepruneError(f"--out {out} exists and is not a directory")
    if not stored_file.is_file():
        if config.resume == "latest":
            raise SafepruneError(f"--resume latest: {out} holds no run to resume")
        if out.is_dir() and any(out.iterdir()):
            raise SafepruneError(f"--out {out} is not empty and holds no safeprune run; choose a new --out")
        return
    stored = RunConfig.from_dict(json.loads(stored_file.read_text()))
    differences = [k for k, v in config.identity().items() if stored.identity().get(k) != v]
    if differences:
        raise SafepruneError(
            f"--out {out} holds a different run (differs in: {', '.join(differences)}); "
            "choose a new --out or repeat the original settings"
        )
    if not config.resume and ckpt.list_checkpoints(out):
        raise SafepruneError(f"--out {out} already holds checkpoints of this run; pass --resume latest to continue")


def check_resume_matches(config: RunConfig, resume_path: Path, resume_meta: dict, teacher_fingerprint: str) -> None:
    """The checkpoint to resume was trained from this teacher, with this run's identity settings."""
    if resume_meta.get("teacher_unet") != teacher_fingerprint:
        raise SafepruneError(f"--resume {resume_path}: the checkpoint was trained from another teacher "
                             "(architecture or weights differ)")
    # a field added since the checkpoint was written had its default value then
    stored_identity = {**RunConfig().identity(), **resume_meta.get("identity", {})}
    differences = [k for k, v in config.identity().items() if stored_identity[k] != v]
    if differences:
        raise SafepruneError(f"--resume {resume_path}: checkpoint belongs to a run with other settings "
                             f"({', '.join(differences)})")
