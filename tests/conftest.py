import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# kernel autotuning decisions (ops/autotune.py) go to a folder of this test session, never the home directory;
# subprocesses (CLI runs, ranks) inherit it
_AUTOTUNE_DIR = tempfile.mkdtemp(prefix="safeprune-test-cache-")
os.environ["SAFEPRUNE_CACHE_DIR"] = _AUTOTUNE_DIR
atexit.register(shutil.rmtree, _AUTOTUNE_DIR, ignore_errors=True)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# tiny models: one torch thread beats two (measured 2-10x on shared 2-core machines: no sync, no contention)
torch.set_num_threads(1)


@pytest.fixture
def tiny_pipeline_dir(tmp_path_factory):
    from safeprune_engine.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("teacher") / "pipe", seed=0)
