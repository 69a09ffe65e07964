import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
