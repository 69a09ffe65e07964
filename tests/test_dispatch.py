"""The backend dispatcher: priority order, forced backends, the environment switch, reference fallback."""
import pytest
import torch

from safeprune_engine.errors import SafepruneError
from safeprune_engine.ops import dispatch
from safeprune_engine.ops.dispatch import Backend, available_backends, choose, register


def _scale_reasons_for(device_types):
    def reasons(*args, **kwargs):
        tensors = dispatch.tensors_in(args)
        return dispatch.device_reasons(tensors, device_types) + dispatch.dtype_reasons(tensors, (torch.float32,))
    return reasons


@pytest.fixture
def scale_op():
    """An op "x * 2" with four backends: cuda (cuda tensors only), triton (never), cpp (cpu fp32), reference."""
    name = "test_dispatch_scale"
    register(name, Backend("reference", lambda x: x * 2))
    register(name, Backend("cpp", lambda x: (x + x), _scale_reasons_for(("cpu",))))
    register(name, Backend("cuda", lambda x: x.mul(2), _scale_reasons_for(("cuda",))))
    register(name, Backend("triton", lambda x: x * 2, lambda *a, **k: ["triton is switched off in this test"]))
    yield name
    dispatch._REGISTRY.pop(name)


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def test_auto_takes_first_backend_without_reasons(scale_op):
    x = torch.randn(3)
    assert choose(scale_op, x).name == "cpp"  # cuda refuses cpu tensors, triton refuses everything
    torch.testing.assert_close(choose(scale_op, x)(x), x * 2)


def test_auto_falls_back_to_reference_when_nothing_else_runs(scale_op):
    x = torch.randn(3, dtype=torch.float64)  # cpp is fp32 only
    assert choose(scale_op, x).name == "reference"
    assert choose(scale_op, x, backend="auto").name == "reference"


def test_auto_without_fast_backends_uses_reference():
    register("test_dispatch_reference_only", Backend("reference", torch.neg))
    try:
        assert choose("test_dispatch_reference_only", torch.ones(1)).name == "reference"
    finally:
        dispatch._REGISTRY.pop("test_dispatch_reference_only")


def test_forced_backend_that_cannot_run_raises_with_its_reasons(scale_op):
    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(SafepruneError, match="backend 'cpp' cannot run.*dtype float64 not supported"):
        choose(scale_op, x, backend="cpp")
    with pytest.raises(SafepruneError, match="tensors on cpu, needs cuda"):
        choose(scale_op, x, backend="cuda")
    with pytest.raises(SafepruneError, match="triton is switched off"):
        choose(scale_op, x, backend="triton")


def test_forced_backend_that_can_run_is_used(scale_op):
    x = torch.randn(3)
    assert choose(scale_op, x, backend="cpp").name == "cpp"
    assert choose(scale_op, x, backend="reference").name == "reference"
    assert choose(scale_op, x, backend="off").name == "reference"
    assert choose(scale_op, x, backend="CPP").name == "cpp"  # case does not matter


def test_forced_backend_missing_for_the_op_raises():
    register("test_dispatch_two_backends", Backend("reference", torch.neg))
    register("test_dispatch_two_backends", Backend("cpp", torch.neg))
    try:
        with pytest.raises(SafepruneError, match="has no 'cuda' backend.*reference, cpp|has no 'cuda' backend"):
            choose("test_dispatch_two_backends", torch.ones(1), backend="cuda")
    finally:
        dispatch._REGISTRY.pop("test_dispatch_two_backends")


def test_environment_variable_selects_and_argument_overrides(scale_op, monkeypatch):
    x = torch.randn(3)
    monkeypatch.setenv(dispatch.ENV_VAR, "off")
    assert choose(scale_op, x).name == "reference"
    assert choose(scale_op, x, backend="cpp").name == "cpp"  # the argument wins over the environment
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert choose(scale_op, x).name == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert choose(scale_op, x).name == "cpp"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")  # forced through the environment: raises like the argument
    with pytest.raises(SafepruneError, match="backend 'cuda' cannot run"):
        choose(scale_op, x)


@pytest.mark.parametrize("value", ["fast", "gpu", "cudnn"])
def test_unknown_request_is_a_clear_error(scale_op, monkeypatch, value):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    with pytest.raises(SafepruneError, match=rf"\$SAFEPRUNE_KERNELS is '{value}'; choose one of auto, off"):
        choose(scale_op, torch.randn(2))
    monkeypatch.delenv(dispatch.ENV_VAR)
    with pytest.raises(SafepruneError, match=f"backend argument is '{value}'"):
        choose(scale_op, torch.randn(2), backend=value)


def test_unknown_op_and_bad_backend_name():
    with pytest.raises(SafepruneError, match="unknown op 'no_such_op'"):
        choose("no_such_op", torch.ones(1))
    with pytest.raises(ValueError, match="not one of"):
        register("test_dispatch_bad", Backend("cudnn", torch.neg))


def test_available_backends_lists_priority_order_and_reasons(scale_op):
    x = torch.randn(3, dtype=torch.float16)
    table = available_backends(scale_op, x)
    assert list(table) == ["cuda", "triton", "cpp", "reference"]
    assert table["cpp"] == ["dtype float16 not supported (supports float32)"]
    assert table["reference"] == []
    assert any("needs cuda" in r for r in table["cuda"])


def test_subclassed_backend():
    class Doubling(Backend):
        name = "cpp"

        def not_supported_reasons(self, x=None):
            return [] if x is None or x.numel() < 10 else ["only small tensors"]

        def __call__(self, x):
            return x * 2

    register("test_dispatch_subclass", Backend("reference", lambda x: x + x))
    register("test_dispatch_subclass", Doubling())
    try:
        assert choose("test_dispatch_subclass", torch.ones(3)).name == "cpp"
        assert choose("test_dispatch_subclass", torch.ones(30)).name == "reference"
        assert available_backends("test_dispatch_subclass") == {"cpp": [], "reference": []}
    finally:
        dispatch._REGISTRY.pop("test_dispatch_subclass")


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    cpu = [torch.ones(2)]
    module = "safeprune_engine.kernels.test_dispatch_not_imported"  # never imported: the environment decides
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_reasons(cpu, module) == []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.triton_reasons(cpu, module) == [
        "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before import)"]
    meta = [torch.ones(2, device="meta")]
    assert "Triton runs on cuda" in dispatch.triton_reasons(meta, module)[0]


def test_device_reasons_catch_mixed_devices():
    reasons = dispatch.device_reasons([torch.ones(1), torch.ones(1, device="meta")], ("cpu", "meta"))
    assert reasons == ["tensors on different devices: cpu, meta"]


def test_auto_never_picks_the_triton_interpreter_for_cpu_tensors():
    name = "test_dispatch_interpreter"
    register(name, Backend("reference", torch.neg))
    register(name, Backend("triton", torch.neg))  # claims it can run anything (as under TRITON_INTERPRET=1)
    try:
        assert choose(name, torch.ones(2)).name == "reference"
        assert choose(name, torch.ones(2), backend="triton").name == "triton"  # forcing it still works
        assert choose(name, torch.ones(2, device="meta")).name == "triton"  # not a CPU tensor: auto may take it
    finally:
        dispatch._REGISTRY.pop(name)


def test_info_lists_every_op_backend_with_reasons(capsys):
    from safeprune_engine import info

    report = info.report()
    assert {"groupnorm_silu", "distill_loss"} <= set(report["backends"])
    for table in report["backends"].values():
        assert list(table)[-1] == "reference" and table["reference"] == []
        if torch.version.cuda is None:
            assert any("CPU-only build" in r for r in table["cuda"])  # a reason, not an exception
    assert info.main([]) == 0
    text = capsys.readouterr().out
    assert "groupnorm_silu:" in text and "reference  available" in text and "torch" in text


def test_auto_skip_reasons_keep_auto_away_but_forcing_still_runs():
    """A backend that can run but is slower than the reference here: auto passes it over, forcing runs it."""
    name = "test_dispatch_auto_skip"
    slow_on_big = lambda x=None: [] if x is None or x.numel() < 10 else ["measured slower than the reference"]
    register(name, Backend("reference", lambda x: x + x))
    register(name, Backend("cpp", lambda x: x * 2, None, slow_on_big))
    try:
        small, big = torch.ones(3), torch.ones(30)
        assert choose(name, small).name == "cpp"
        assert choose(name, big).name == "reference"
        assert choose(name, big, backend="cpp").name == "cpp"
        assert choose(name, big, backend="cpp").auto_skip_reasons(big) == ["measured slower than the reference"]
        assert available_backends(name, big) == {"cpp": [], "reference": []}  # it can run: not a hard reason
    finally:
        dispatch._REGISTRY.pop(name)


def test_cuda_inputs_are_dispatched_by_their_device_without_a_gpu(scale_op):
    """Dispatch reads only declared capabilities (device, dtype, shape), so inputs on a CUDA device can be
    described by fake tensors on any machine (the op tests use this to check their CUDA choices here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, device="cuda")
    assert choose(scale_op, x).name == "cuda"
    assert available_backends(scale_op, x)["cpp"] == ["tensors on cuda, needs cpu"]
    with pytest.raises(SafepruneError, match="tensors on cuda, needs cpu"):
        choose(scale_op, x, backend="cpp")
