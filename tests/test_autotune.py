"""Auto mode's measured choice (ops/autotune.py): timed once per key, cached in memory and on disk per device,
the fastest backend wins, forced backends and SAFEPRUNE_AUTOTUNE=0 bypass timing, bad cache files are ignored."""
import json
import time

import pytest
import torch
import torch.nn.functional as F

from safeprune_engine.ops import autotune, dispatch, native
from safeprune_engine.ops.dispatch import Backend, choose, register, register_benchmark
from safeprune_engine.ops.groupnorm_silu import OP as GN, groupnorm_silu


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test starts with an empty cache folder of its own and auto mode on."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(autotune.ENV_SWITCH, raising=False)
    cache = autotune.DecisionCache(tmp_path / "autotune")
    previous = autotune.set_cache(cache)
    autotune.reset_stats()
    yield cache
    autotune.set_cache(previous)
    autotune.reset_stats()


def use_fresh_cache(directory) -> autotune.DecisionCache:
    """A new cache object on the same folder: what a second process starts with (nothing in memory)."""
    cache = autotune.DecisionCache(directory)
    autotune.set_cache(cache)
    return cache


def needs_cpp():
    reasons = dispatch.available_backends(GN)["cpp"]
    if reasons:
        pytest.skip("; ".join(reasons))


def gn_inputs(shape, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    w = (torch.rand(shape[1], generator=gen) + 0.5).requires_grad_(grad)
    b = torch.randn(shape[1], generator=gen).requires_grad_(grad)
    return x, w, b


def gn_entries(cache: autotune.DecisionCache) -> dict:
    files = list(cache.directory.glob("cpu-*.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    assert data["format"] == autotune.FORMAT and data["fingerprint"]["device"] == "cpu"
    assert data["fingerprint"]["threads"] == torch.get_num_threads()
    return {k: v for k, v in data["entries"].items() if k.startswith(GN + ":")}


# ---- a real op: groupnorm_silu, cpp against the reference on CPU -----------------------------------------------
def test_real_op_is_timed_once_per_key_and_cached_in_memory_and_on_disk(fresh_cache):
    needs_cpp()
    x, w, b = gn_inputs((2, 8, 5, 3))
    y = groupnorm_silu(x, 4, w, b)
    y.backward(torch.randn_like(y))
    # forward and backward dispatch calls share one key: one timing (forward + backward) for both
    assert fresh_cache.timings == 1
    entries = gn_entries(fresh_cache)
    assert len(entries) == 1
    (key, entry), = entries.items()
    assert "float32[2x8x5x3]" in key and "float32[8]g" in key
    assert set(entry["ms"]) == {"cpp", "reference"} and all(t > 0 for t in entry["ms"].values())
    assert entry["backend"] == min(entry["ms"], key=entry["ms"].get)  # the measured fastest
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 4, w, b)), atol=1e-5, rtol=1e-4)

    for _ in range(3):  # same key: from memory
        assert choose(GN, x, 4, w, b).name == entry["backend"]
    groupnorm_silu(x, 4, w, b).sum().backward()
    assert fresh_cache.timings == 1

    groupnorm_silu(torch.randn(3, 8, 4, 4), 4, w, b).sum().backward()  # another shape: timed on its own
    with torch.no_grad():
        groupnorm_silu(x, 4, w.detach(), b.detach())  # no grad needed: another key (forward only)
    assert fresh_cache.timings == 3
    assert len(gn_entries(fresh_cache)) == 3

    lines = autotune.summary_lines()
    assert len(lines) == 1 and lines[0].startswith(f"kernels auto: {GN}: 3 call shapes") and "3 timed" in lines[0]
    assert autotune.summary_lines(new_only=True) == []


def test_a_fresh_cache_reads_the_decision_from_disk_without_timing(fresh_cache):
    needs_cpp()
    x, w, b = gn_inputs((1, 6, 4, 4))
    groupnorm_silu(x, 3, w, b).sum().backward()
    assert fresh_cache.timings == 1
    # make the file say the opposite of what was measured: a reader that follows it cannot have timed again
    path, = fresh_cache.directory.glob("cpu-*.json")
    data = json.loads(path.read_text())
    (key, entry), = data["entries"].items()
    other = "reference" if entry["backend"] == "cpp" else "cpp"
    entry["backend"] = other
    path.write_text(json.dumps(data))

    second = use_fresh_cache(fresh_cache.directory)
    autotune.reset_stats()
    assert choose(GN, x, 3, w, b).name == other
    groupnorm_silu(x, 3, w, b).sum().backward()
    assert second.timings == 0
    assert "1 from the cache" in autotune.summary_lines()[0]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 999, "entries": {}}),
                                     json.dumps([1, 2]), "fingerprint"])
def test_a_corrupt_or_foreign_cache_file_is_ignored_with_a_warning_and_replaced(fresh_cache, content):
    needs_cpp()
    x, w, b = gn_inputs((1, 4, 3, 3))
    context = autotune._device_context(x.device)
    path = fresh_cache.path(context)
    path.parent.mkdir(parents=True)
    if content == "fingerprint":  # a well-formed file written for another device
        content = json.dumps({"format": autotune.FORMAT, "fingerprint": {**autotune.fingerprint(context),
                                                                         "model": "another CPU"},
                              "entries": {"x": {"backend": "cpp"}}})
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="autotune cache .* (unreadable|ignored)"):
        groupnorm_silu(x, 2, w, b).sum().backward()
    assert fresh_cache.timings == 1
    assert len(gn_entries(fresh_cache)) == 1  # rewritten whole, with the new decision only
    assert not list(path.parent.glob("*.tmp"))


def test_static_rule_when_switched_off_and_for_fake_tensors(fresh_cache, monkeypatch):
    needs_cpp()
    x, w, b = gn_inputs((1, 4, 3, 3))
    static = "reference" if dispatch._backends(GN)["cpp"].auto_skip_reasons(x, 2, w, b) else "cpp"
    monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    assert choose(GN, x, 2, w, b).name == static  # first in priority order without (auto-skip) reasons
    groupnorm_silu(x, 2, w, b).sum().backward()
    monkeypatch.delenv(autotune.ENV_SWITCH)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(1, 4, 3, 3), torch.empty(4), torch.empty(4)
    assert choose(GN, fake[0], 2, fake[1], fake[2]).name == static
    assert fresh_cache.timings == 0 and not fresh_cache.directory.exists()


# ---- test ops with deliberately slow backends ------------------------------------------------------------------
class Counting:
    """``x * 2`` after sleeping `delay` seconds; counts its calls."""

    def __init__(self, delay: float):
        self.delay, self.calls = delay, 0

    def __call__(self, x):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return x * 2


def cpu_only(*args, **kwargs):
    return dispatch.device_reasons(dispatch.tensors_in(args), ("cpu",))


@pytest.fixture
def timed_op():
    """An op whose cpp and reference backends sleep as the test says; cuda cannot run CPU tensors."""
    ops = []

    def make(cpp_delay: float, reference_delay: float, name: str = "test_autotune_op"):
        fns = {"reference": Counting(reference_delay), "cpp": Counting(cpp_delay), "cuda": Counting(0)}
        register(name, Backend("reference", fns["reference"]))
        register(name, Backend("cpp", fns["cpp"], cpu_only))
        register(name, Backend("cuda", fns["cuda"], lambda *a, **k: ["tensors on cpu, needs cuda"] if a else []))
        register(name, Backend("triton", fns["cuda"]))  # claims anything: auto must still not time it on CPU
        grads = []

        def bench(backend, args, kwargs, grad):
            grads.append(grad)
            return lambda: backend(*args)

        register_benchmark(name, bench)
        ops.append(name)
        return name, fns, grads

    yield make
    for name in ops:
        dispatch._REGISTRY.pop(name)
        autotune._BENCHMARKS.pop(name)


def test_auto_avoids_a_backend_measured_slower_than_eager(fresh_cache, timed_op):
    name, fns, _ = timed_op(cpp_delay=0.003, reference_delay=0)
    x = torch.randn(5)
    assert choose(name, x).name == "reference"  # the static rule would take cpp (first by priority)
    assert fns["cpp"].calls >= 1 + autotune.MIN_REPS and fns["cuda"].calls == 0  # cuda and triton never timed
    calls = fns["cpp"].calls
    assert choose(name, x).name == "reference" and fns["cpp"].calls == calls  # decided: no more timing
    assert fresh_cache.timings == 1


def test_auto_takes_a_fused_backend_measured_faster(fresh_cache, timed_op):
    name, fns, _ = timed_op(cpp_delay=0, reference_delay=0.003)
    x = torch.randn(5)
    assert choose(name, x).name == "cpp"
    entry = fresh_cache.lookup(autotune._device_context(x.device), f"{name}:cpu:float32[5]")
    assert entry["backend"] == "cpp" and entry["ms"]["reference"] > 2.9 and set(entry["ms"]) == {"cpp", "reference"}


def test_forced_backends_bypass_timing(fresh_cache, timed_op):
    name, fns, _ = timed_op(cpp_delay=0.003, reference_delay=0)
    x = torch.randn(5)
    assert choose(name, x, backend="cpp").name == "cpp"
    assert choose(name, x, backend="off").name == "reference"
    assert fresh_cache.timings == 0 and fns["cpp"].calls == 0 and fns["reference"].calls == 0


def test_switched_off_auto_uses_the_static_rule(fresh_cache, timed_op, monkeypatch):
    name, fns, _ = timed_op(cpp_delay=0.003, reference_delay=0)
    monkeypatch.setenv(autotune.ENV_SWITCH, "off")
    assert choose(name, torch.randn(5)).name == "cpp"
    assert fresh_cache.timings == 0 and fns["cpp"].calls == 0


def test_key_separates_shapes_dtypes_layouts_and_grads(fresh_cache, timed_op):
    name, fns, grads = timed_op(cpp_delay=0, reference_delay=0)
    x = torch.randn(2, 3, 4, 5)
    variants = [x, torch.randn(2, 3, 4, 6), x.double(), x.contiguous(memory_format=torch.channels_last),
                x.transpose(2, 3), x.clone().requires_grad_()]
    for v in variants + variants:
        choose(name, v)
    assert fresh_cache.timings == len(variants)
    assert grads == [False] * (len(variants) - 1) * 2 + [True] * 2  # bench asked for the backward once grads flow
    keys = {autotune.describe(v) for v in variants}
    assert len(keys) == len(variants) and "float32[2x3x4x5]cl" in keys and "float32[2x3x4x5]g" in keys


def test_a_backend_that_fails_while_timed_is_left_out(fresh_cache, timed_op):
    name, fns, _ = timed_op(cpp_delay=0, reference_delay=0.002)

    def broken(x):
        raise RuntimeError("out of memory (simulated)")

    register(name, Backend("cpp", broken, cpu_only))
    with pytest.warns(RuntimeWarning, match="'cpp' of test_autotune_op failed while being timed"):
        assert choose(name, torch.randn(5)).name == "reference"


def test_writes_merge_what_other_processes_wrote(fresh_cache, timed_op):
    """Two caches on one folder (two processes): each write keeps the other's entries; no temporary file stays."""
    name, fns, _ = timed_op(cpp_delay=0, reference_delay=0)
    choose(name, torch.randn(3))
    other = use_fresh_cache(fresh_cache.directory)
    choose(name, torch.randn(3))  # the second process reads the file: one entry
    assert other.timings == 0
    autotune.set_cache(fresh_cache)
    choose(name, torch.randn(4))  # the first process adds one
    autotune.set_cache(other)
    choose(name, torch.randn(7))  # the second adds one: its write must keep the first's new entry
    path, = fresh_cache.directory.iterdir()
    entries = json.loads(path.read_text())["entries"]
    assert {k.split(":")[-1] for k in entries} == {"float32[3]", "float32[4]", "float32[7]"}


def test_unwritable_cache_folder_warns_and_keeps_decisions_in_memory(tmp_path, timed_op):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = use_fresh_cache(blocker / "autotune")  # a folder under a file: cannot be created, even by root
    name, fns, _ = timed_op(cpp_delay=0, reference_delay=0.002)
    x = torch.randn(5)
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        assert choose(name, x).name == "cpp"
    assert choose(name, x).name == "cpp" and cache.timings == 1


def test_device_fingerprint_names_the_file(fresh_cache, monkeypatch):
    one, two = ("cpu", 1, ""), ("cpu", 2, "")
    assert fresh_cache.path(one) != fresh_cache.path(two)  # another thread count: other speeds, another file
    fp = autotune.fingerprint(one)
    assert {"model", "torch_isa", "kernels_isa", "threads", "torch", "format"} <= set(fp)
    assert fp["kernels_isa"] == native.cpu_isa()
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, "/somewhere")
    assert autotune.default_directory() == autotune.Path("/somewhere/autotune")


def test_a_cached_backend_that_can_no_longer_run_is_not_used(fresh_cache, timed_op):
    """The file says cpp, but in this process cpp is not built: auto checks the reasons of what it reads."""
    name, fns, _ = timed_op(cpp_delay=0, reference_delay=0.003)
    x = torch.randn(5)
    assert choose(name, x).name == "cpp"
    use_fresh_cache(fresh_cache.directory)
    register(name, Backend("cpp", fns["cpp"], lambda *a, **k: ["the library is not built"]))
    assert choose(name, x).name == "reference"
