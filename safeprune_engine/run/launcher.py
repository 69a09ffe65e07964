"""`--launcher deepspeed|torchrun --nproc N`: re-run the same `safeprune run` as N ranks on this machine.

The parent process validates the config (so a bad flag fails once, before any rank starts), writes it to a
temporary JSON file and starts `python -m safeprune_engine.cli run --config FILE` under the launcher; the ranks
find RANK / WORLD_SIZE / ... in their environment and run the distributed path. The parent waits and returns
what the ranks wrote to --out.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import SafepruneError
from ..distributed.runtime import free_port

log = logging.getLogger("safeprune_engine")


def launch_command(config, config_file: str, port: int) -> list[str]:
    """The command line that starts config.nproc ranks of `safeprune run --config config_file`."""
    run = ["safeprune_engine.cli", "run", "--config", config_file]
    if config.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                str(config.nproc), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", *run]
    if config.launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(config.nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank", "--module", *run]
    raise SafepruneError(f"unknown launcher {config.launcher!r}")


def check_launcher_available(config) -> None:
    """What the ranks would fail on at start-up, checked once here: DeepSpeed present, precisions it supports."""
    if config.launcher == "deepspeed" or config.zero_stage >= 1 or config.teacher_zero3:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed  # noqa: F401
        except ImportError as error:
            raise SafepruneError(f"--launcher deepspeed, --zero-stage >= 1 and --teacher-zero3 need DeepSpeed (pip "
                                 f"install 'safeprune-engine[scale]'): {error}") from None
        from ..distributed.runtime import check_precisions_supported

        check_precisions_supported(config)


def launch(config) -> int:
    """Start the ranks and wait for them. Returns their exit code (0 = every rank finished)."""
    check_launcher_available(config)
    with tempfile.TemporaryDirectory(prefix="safeprune-launch-") as folder:
        config_file = str(Path(folder) / "run_config.json")
        Path(config_file).write_text(json.dumps(config.to_dict(), indent=2))
        command = launch_command(config, config_file, free_port())
        env = dict(os.environ, SAFEPRUNE_LAUNCHED="1")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.nproc)))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log.info("starting %d ranks with %s", config.nproc, config.launcher)
        return subprocess.run(command, env=env).returncode
