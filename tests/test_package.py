"""Package-level promises: a light import, lazy public names, the CLI entry point."""
import dataclasses
import os
import re
import subprocess
import sys


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return result.stdout.strip()


def test_import_is_light():
    heavy = ["diffusers", "transformers", "deepspeed", "triton", "torch_pruning", "bitsandbytes", "safetensors"]
    loaded = run_python(
        "import sys, safeprune_engine; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    assert loaded == ""


def test_public_names_resolve_lazily():
    out = run_python(
        "import sys, safeprune_engine as sp; c = sp.RunConfig; print('diffusers' in sys.modules); "
        "sp.PrunedUNet2DConditionModel; print('diffusers' in sys.modules)"
    )
    assert out.splitlines() == ["False", "True"]


def run_help_by_flag() -> dict[str, str]:
    """`safeprune run --help` as {flag: its help text}, read from a real process's output."""
    env = dict(os.environ, COLUMNS="1000")
    text = subprocess.run([sys.executable, "-m", "safeprune_engine.cli", "run", "--help"], capture_output=True,
                          text=True, check=True, env=env).stdout
    entries: list[list[str]] = []
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):  # an option: its flags, then its help (here or on the next lines)
            invocation, _, help_text = line.strip().partition("  ")
            entries.append([invocation, help_text.strip()])
        elif line.startswith("   ") and entries:
            entries[-1][1] = f"{entries[-1][1]} {line.strip()}".strip()
    return {flag: help_text for invocation, help_text in entries
            for flag in re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", invocation)}


def test_run_help_has_a_flag_per_config_field_showing_its_default():
    from safeprune_engine.cli import RUN_OPTIONS
    from safeprune_engine.config import RunConfig
    from safeprune_engine.toy.default_run import TOY_TRAINING

    helps = run_help_by_flag()
    stock = RunConfig()
    declared = {f.name: f for f in dataclasses.fields(RunConfig)}
    not_flags = {name for name, f in declared.items() if not f.metadata.get("flag", True)}
    assert not_flags == {"version"}  # written into saved configs, never given on the command line
    settings = {"--" + name.replace("_", "-"): name for name in declared if name not in not_flags}
    assert set(settings) <= set(helps), set(settings) - set(helps)
    for flag in helps:  # the reverse: every flag is a setting, its --no- form, or a named non-setting option
        known = flag in settings or flag.replace("--no-", "--") in settings or flag in {"-h", "--help", *RUN_OPTIONS}
        assert known, flag
    for flag, name in settings.items():
        shown = re.search(r"\(default: (.+?)(?:; the built-in default run uses (\S+))?\)$", helps[flag])
        assert shown, (flag, helps[flag])
        value = getattr(stock, name)
        if value is None or value == []:  # what "unset" means, in words
            assert shown[1] not in ("None", "[]", "") and "None" not in shown[1], (flag, helps[flag])
        else:
            assert shown[1] == str(value), (flag, helps[flag])
        assert shown[2] == (str(TOY_TRAINING[name]) if name in TOY_TRAINING else None), (flag, helps[flag])
        for choice in declared[name].metadata.get("choices") or ():
            assert str(choice) in helps[flag], (flag, choice)
    assert helps["--steps"].endswith(f"(default: {stock.steps}; the built-in default run uses {TOY_TRAINING['steps']})")
    assert "(default: 5 x lr" in helps["--lr-upper"]
    assert helps["--use-8bit-adam"].endswith("(default: False)") and "--no-progress" in helps
