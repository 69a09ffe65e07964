"""Real Stable Diffusion architectures with random weights: their sizes, and (opt-in, slow) one SD-1.5-sized run."""
import json
import re
import time
from pathlib import Path

import pytest
import torch

from safeprune_engine.errors import SafepruneError
from safeprune_engine.models import sd_configs


def test_sd_architectures_have_their_real_sizes():
    from diffusers import UNet2DConditionModel

    sizes = {}
    for arch in sd_configs.ARCHITECTURES:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**sd_configs.unet_config(arch))
        sizes[arch] = sum(p.numel() for p in unet.parameters())
    # SD-1.5 859.5M, SD-2.1 865.9M, SDXL base 2567.5M parameters
    assert 855e6 < sizes["sd15"] < 862e6 and 862e6 < sizes["sd21"] < 868e6 and 2.55e9 < sizes["sdxl"] < 2.58e9
    assert sd_configs.scheduler_config("sd21")["prediction_type"] == "v_prediction"
    assert sd_configs.scheduler_config("sd15")["prediction_type"] == "epsilon"
    assert sd_configs.unet_config("sdxl")["addition_embed_type"] == "text_time"


def test_sdxl_is_refused_with_its_tracked_reason():
    for call in (lambda: sd_configs.build_pipeline("sdxl"), lambda: sd_configs.check_trainable("sdxl"),
                 lambda: sd_configs.text_encoder_config("sdxl")):
        with pytest.raises(SafepruneError, match="Tracked limitations: SDXL") as error:
            call()
        assert "text_embeds" in str(error.value) and "time_ids" in str(error.value)
    with pytest.raises(SafepruneError, match="unknown architecture"):
        sd_configs.unet_config("sd3")


def peak_rss_gib() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", text, flags=re.MULTILINE).group(1)) / 2**20


@pytest.mark.slow
def test_sd15_architecture_prunes_trains_two_bilevel_steps_and_exports(tmp_path, record_property):
    """SD-1.5's UNet (860M parameters, random weights), pruned to about half its MACs, two bilevel steps (an inner
    and an outer one) at 64 px (8x8 latents), exported as a pipeline that plain diffusers loads.

    The bilevel solver keeps two Adam states over the whole student (inner and outer); measured on a 2-core CPU,
    this run takes 53 s and peaks at 12.1 GiB RSS with --use-8bit-adam (used here), 75 s and 17.2 GiB with fp32
    AdamW."""
    from diffusers import StableDiffusionPipeline

    from safeprune_engine.config import RunConfig
    from safeprune_engine.models.teacher import bundle_from_pipeline
    from safeprune_engine.testing import write_image_folder
    from safeprune_engine.run import train

    started = time.perf_counter()
    teacher = bundle_from_pipeline(sd_configs.build_pipeline("sd15", seed=0))
    built = time.perf_counter()
    data = write_image_folder(tmp_path / "data", ["a red square", "a blue square"], size=64)
    config = RunConfig(teacher="random-sd15", data=str(data), out=str(tmp_path / "run"), erase=["by monet"],
                       method="bilevel", steps=2, bilevel_inner_steps=1, batch_size=1, resolution=64,
                       prune_ratio=0.5, esd_pool_size=2, esd_ddim_steps=2, lr=1e-5, log_every=1, progress=False,
                       device="cpu", keep_checkpoints=1, use_8bit_adam=True)
    result = train(config, teacher=teacher)
    finished = time.perf_counter()
    report = result.prune_report
    assert 0.3 < report["macs_after"] / report["macs_before"] < 0.7
    assert 0.3 < report["params_after"] / report["params_before"] < 0.75
    assert [h["step"] for h in result.history] == [1, 2] and "loss/cu" in result.history[1]
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in result.history)
    pipe = StableDiffusionPipeline.from_pretrained(result.pipeline_dir, local_files_only=True)
    assert sum(p.numel() for p in pipe.unet.parameters()) == report["params_after"]
    timings = {"build_s": built - started, "prune_train_export_s": finished - built,
               "peak_rss_gib": peak_rss_gib(), "params_before": report["params_before"],
               "params_after": report["params_after"], "macs_before": report["macs_before"],
               "macs_after": report["macs_after"]}
    print("SD-1.5 scale run:", json.dumps(timings))
    for key, value in timings.items():
        record_property(key, value)
