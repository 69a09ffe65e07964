"""Package-level promises: a light import, lazy public names, the CLI entry point."""
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


def test_cli_help_lists_every_run_flag():
    from safeprune_engine.cli import RUN_FLAGS, build_parser
    from safeprune_engine.config import RunConfig

    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    flags = {option for action in run._actions for option in action.option_strings}
    for name in RUN_FLAGS:
        assert "--" + name.replace("_", "-") in flags
        assert hasattr(RunConfig(), name), name  # every flag is a config key of the same name
