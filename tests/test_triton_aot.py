"""GPU readiness without a GPU: every Triton kernel compiles ahead of time for sm_80 and sm_90 at the launch
configurations its launcher picks for SD-1.5 shapes and pruned widths (benchmarks/triton_aot.py, run in a
subprocess because the kernels must not be interpreted there), and the bf16/fp16 paths use no local memory
(no register spills). The default run compiles a representative subset; the full sweep is marked slow.
Registers and spills are printed (pytest -s) and kept in the JSON under the test's tmp folder."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_aot.py"
OPS = ("groupnorm_silu", "distill_loss", "pruned_conv")
TARGETS = {"sm_80", "sm_90"}

pytest.importorskip("triton")


def _launched_kernels(op: str) -> set[str]:
    """The kernels kernels/<op>.py defines (every @triton.jit function named *_kernel is launched by it)."""
    return set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", (ROOT / "kernels" / f"{op}.py").read_text()))


def _sweep(out: Path, subset: str, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, str(SCRIPT), "--subset", subset, "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-6000:])
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    data["returncode"] = result.returncode
    return data


@pytest.fixture(scope="module")
def default_sweep(tmp_path_factory):
    return _sweep(tmp_path_factory.mktemp("triton_aot") / "triton_aot.json", "default", timeout=1200)


def _rows(data):
    return [(case, data["compiles"][i]) for case in data["cases"] for i in case["kernels"]]


def _check_sweep(data):
    for op in OPS:
        compiled = {(k["kernel"], k["target"]) for case, k in _rows(data) if case["op"] == op}
        expected = {(name, target) for name in _launched_kernels(op) for target in TARGETS}
        assert expected <= compiled, f"{op}: not compiled: {sorted(expected - compiled)}"
    for case, k in _rows(data):
        assert 0 < k["regs"] <= 255, (case["case"], k)
        if case["dtype"] in ("bfloat16", "float16"):
            assert k["spill_bytes"] == 0, (
                f"{case['op']} {case['dtype']} {case['case']}: {k['kernel']} on {k['target']} spills "
                f"{k['spill_bytes']} B/thread at {k['regs']} registers ({k['constexprs']}, {k['num_warps']} warps)")
    assert data["returncode"] == 0


def test_every_kernel_compiles_for_sm80_and_sm90_and_low_precision_does_not_spill(default_sweep):
    _check_sweep(default_sweep)
    assert {c["dtype"] for c in default_sweep["cases"]} >= {"bfloat16", "float16"}


def test_the_measurement_sees_spills(default_sweep):
    """A tile that cannot fit in registers shows up as local memory: a zero elsewhere is a measurement."""
    calibration = default_sweep["calibration"]
    assert calibration["spill_bytes"] > 0 and calibration["regs"] >= 200, calibration


def test_launches_use_the_launchers_gpu_configuration(default_sweep):
    """GroupNorm at (2, 320, 64, 64), 32 groups: the GPU tile of 4096 elements (16 channels x 256 pixels, 16 warps),
    not the interpreter's 16384-element one, and the unit pixel stride specialised as on a device."""
    case = next(c for c in default_sweep["cases"]
                if c["op"] == "groupnorm_silu" and c["case"].startswith("(2,320,64,64) G=32 nchw"))
    apply = next(default_sweep["compiles"][i] for i in case["kernels"]
                 if default_sweep["compiles"][i]["kernel"] == "_apply_kernel")
    assert apply["constexprs"]["BLOCK_CG"] == 16 and apply["constexprs"]["BLOCK_HW"] == 256, apply
    assert apply["num_warps"] == 16 and apply["constexprs"].get("s_hw") == 1, apply


@pytest.mark.slow
def test_full_sweep_low_precision_does_not_spill(tmp_path):
    data = _sweep(tmp_path / "triton_aot.json", "full", timeout=3600)
    _check_sweep(data)
    assert {c["dtype"] for c in data["cases"]} == {"float32", "bfloat16", "float16"}
