"""Unlearning objectives behind --erase-method (ESD-u/x, Concept Ablation model/noise, UCE, SalUn), multi-concept
erasure with per-concept anchors, --preserve prompts, and every objective with every solver. Real tiny models."""
from __future__ import annotations

import copy

import pytest
import torch

from safeprune_engine.bilevel.engine import accumulate_gradients
from safeprune_engine.bilevel.solvers import build_solver
from safeprune_engine.config import RunConfig
from safeprune_engine.errors import SafepruneError
from safeprune_engine.unlearn.base import OBJECTIVES
from safeprune_engine.unlearn.uce import uce_closed_form, uce_objective

ERASE_METHODS = ["esd-u", "esd-x", "concept-ablation-model", "concept-ablation-noise", "uce", "salun"]
SOLVERS = ["bilevel", "alternating", "two-stage", "distill-only"]
CAPTIONS = ["a red square", "a blue square", "a green square", "a yellow square"] * 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from safeprune_engine.data.imagefolder import ImageFolder
    from safeprune_engine.models.teacher import bundle_from_pipeline
    from safeprune_engine.prune.width import prune
    from safeprune_engine.testing import tiny_pipeline, write_image_folder

    root = tmp_path_factory.mktemp("unlearn")
    teacher = bundle_from_pipeline(tiny_pipeline(seed=0))
    student, _ = prune(teacher.unet, ratio=0.5)
    return {"teacher": teacher, "student": student, "root": root,
            "folder": ImageFolder(write_image_folder(root / "data", CAPTIONS, size=16))}


def make_engine(world, **overrides):
    from safeprune_engine.memory import optimizer_factory
    from safeprune_engine.run.builder import build_engine

    settings = dict(out=str(world["root"] / "run"), erase=["by monet"], method="two-stage", batch_size=2,
                    concept_batch_size=4, resolution=16, steps=4, bilevel_inner_steps=1, upper_every=2,
                    two_stage_erase_steps=2, esd_pool_size=4, esd_ddim_steps=3, progress=False, lr=1e-3,
                    salun_batches=2, device="cpu", quality_tolerance=None,  # the penalty form: one teacher pass a step
                    caption_dropout=0.0,  # these tests are about the upper level; keep the data rows' draws fixed
                    kernels="off")  # the module-wide teacher stays unpatched whatever --kernels auto would time
    settings.update(overrides)
    config = RunConfig(**settings).validate()
    engine = build_engine(config, world["teacher"], copy.deepcopy(world["student"]), world["folder"],
                          world["root"] / "cache", latent_size=8, progress=False)
    return engine, build_solver(engine, config, optimizer_factory(config))


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_registry_lists_every_builtin_objective():
    assert set(ERASE_METHODS) <= set(OBJECTIVES.names())
    with pytest.raises(SafepruneError, match="concept-ablation-model"):
        RunConfig(erase=["x"], erase_method="esd-z").validate()


# two concepts, each with its own anchor: every method must lower each concept's own objective
@pytest.mark.parametrize("erase_method", ERASE_METHODS)
def test_objective_changes_only_its_parameters_and_lowers_every_concepts_objective(world, erase_method):
    lr_upper = 1e-4 if erase_method == "esd-u" else 1e-3  # esd-u moves every non-attn2 weight: a smaller step
    engine, solver = make_engine(world, erase=["by monet", "by picasso"], anchor=["a painting", "strip"],
                                 erase_method=erase_method, steps=11, two_stage_erase_steps=10, lr_upper=lr_upper)
    objective = engine.objective
    solver.step(0)  # one distillation step, then the reference is frozen and every step is an erase step
    solver.freeze_reference()
    before = [objective.evaluate(engine, concept=c, batches=3, reference=solver.reference) for c in (0, 1)]
    weights = snapshot(engine.student)
    for step in range(1, 11):
        assert "loss/cu" in solver.step(step)
    after = [objective.evaluate(engine, concept=c, batches=3, reference=solver.reference) for c in (0, 1)]
    assert after[0] < before[0] and after[1] < before[1], (before, after)
    moved = {n for n, p in engine.student.named_parameters() if not torch.equal(weights[n], p.detach())}
    assert moved and all(objective.trainable(n) for n in moved), sorted(n for n in moved if not objective.trainable(n))
    expected = {
        "esd-u": lambda n: ".attn2." not in n,
        "esd-x": lambda n: ".attn2." in n,
        "concept-ablation-model": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
        "concept-ablation-noise": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
        "uce": lambda n: n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")),
        "salun": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,  # its default base: concept-ablation-model
    }[erase_method]
    assert all(expected(n) for n in moved)
    if erase_method != "salun":  # salun leaves out weights with no salient element
        assert len(moved) >= 0.9 * sum(expected(n) for n in weights)


def test_concept_batches_carry_each_concepts_anchor(world):
    from safeprune_engine.data.cache import encode_prompts

    engine, _ = make_engine(world, erase=["by monet", "by picasso"], anchor=["a painting", "strip"],
                            erase_prompts=["a red square by monet", "a cat by picasso"], erase_method="esd-x")
    anchors = encode_prompts(world["teacher"], ["a painting", "a cat"])
    generator = torch.Generator().manual_seed(0)
    for concept in (0, 1):
        batch = engine.concepts.sample(4, generator, concept=concept)
        assert batch.concept.tolist() == [concept] * 4
        torch.testing.assert_close(batch.conditions["anchor"], anchors[concept].expand(4, -1, -1))


def test_anchor_images_are_clean_teacher_samples_with_a_known_target(world):
    from safeprune_engine.unlearn.sources import AnchorImageSource

    engine, _ = make_engine(world, erase_method="concept-ablation-noise", anchor="a painting")
    assert isinstance(engine.concepts, AnchorImageSource) and len(engine.concepts) == 4
    assert list((world["root"] / "cache").glob("anchor-images-*.safetensors"))
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    batch = engine.concepts.sample(3, generator)
    generator.set_state(state)  # replay the draws: z_t = sqrt(a) z0 + sqrt(1 - a) eps, eps the target
    index = torch.randint(0, 4, (3,), generator=generator)
    z0 = engine.concepts.latents[index]
    noise = torch.randn(z0.shape, generator=generator)
    t = torch.randint(0, 1000, (3,), generator=generator)
    a = engine.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.target, noise)
    torch.testing.assert_close(batch.latents, a.sqrt() * z0 + (1 - a).sqrt() * noise)
    assert z0.std() > 0.1


def test_salun_gradient_reaches_only_the_salient_elements(world):
    engine, _ = make_engine(world, erase_method="salun", salun_base="esd-x", salun_topk=0.3)
    masks = engine.objective.gradient_masks()
    attn2 = {n: p for n, p in engine.student.named_parameters() if ".attn2." in n}
    kept = sum(int(m.sum()) for m in masks.values())
    assert set(masks) <= set(attn2) and kept == pytest.approx(0.3 * sum(p.numel() for p in attn2.values()), rel=0.02)
    concept = engine.sample_concept_batch()
    loss = engine.upper_loss(concept, engine.teacher_pass(None, concept, features=False))
    accumulate_gradients(loss, engine.upper_parameters())
    for name, param in engine.student.named_parameters():
        if name in masks:
            assert torch.all(param.grad[~masks[name]] == 0), name
            assert param.grad[masks[name]].abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("rows,dim,erase,preserve", [(37, 32, 6, 5), (200, 24, 3, 0), (8, 16, 40, 40)])
def test_uce_closed_form_is_the_least_squares_solution(rows, dim, erase, preserve):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    ce, cg = torch.randn(erase, dim, generator=gen, dtype=torch.float64), torch.randn(erase, dim, generator=gen,
                                                                                        dtype=torch.float64)
    cp, lam = torch.randn(preserve, dim, generator=gen, dtype=torch.float64), 0.3
    edited = uce_closed_form(w, ce, cg, cp, lam)
    # min ||sqrt(lam) (W' - W)||^2 + ||C_e W'^T - C_g W^T||^2 + ||C_p W'^T - C_p W^T||^2 as one stacked system
    a = torch.cat([lam ** 0.5 * torch.eye(dim, dtype=torch.float64), ce, cp])
    b = torch.cat([lam ** 0.5 * w.T, cg @ w.T, cp @ w.T])
    solution = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(edited, solution, atol=1e-9, rtol=1e-9)
    assert uce_objective(edited, w, ce.float(), cg.float(), cp.float(), lam) < uce_objective(w, w, ce.float(),
                                                                                              cg.float(), cp.float(), lam)
    assert edited.float().dtype == torch.float32 and uce_closed_form(w.float(), ce, cg, cp, lam).dtype == torch.float32


def _key_value(engine):
    return {n: p.detach().clone() for n, p in engine.student.named_parameters() if engine.objective.trainable(n)}


def test_uce_edit_minimises_its_objective_and_runs_when_asked(world):
    engine, _ = make_engine(world, erase_method="uce", preserve=["a cat", "a dog"], uce_when="every:2")
    uce = engine.objective
    assert engine.sample_concept_batch() is None  # no latents: UCE works from text embeddings alone
    params = [p for n, p in engine.student.named_parameters() if uce.trainable(n)]

    def largest_gradient():
        return max(g.abs().max() for g in torch.autograd.grad(uce.loss(), params))

    weights = _key_value(engine)
    before, gradient_before = uce.evaluate(engine), largest_gradient()
    uce.on_train_start(engine, 0)
    uce.on_step_end(engine, 1)
    assert all(torch.equal(weights[n], p) for n, p in _key_value(engine).items())  # not scheduled: untouched
    uce.on_step_end(engine, 2)
    edited = _key_value(engine)
    assert all(not torch.equal(weights[n], edited[n]) for n in weights)
    assert all(torch.equal(uce.reference[n], weights[n]) for n in weights)  # the pre-edit weights are the reference
    assert uce.evaluate(engine) < 0.5 * before
    # the edit is the minimiser of its objective: the gradient vanishes there
    assert largest_gradient() < 1e-3 * gradient_before
    # before / after run only at their moment
    for when, call in (("before", lambda u, e: u.on_train_start(e, 0)), ("after", lambda u, e: u.on_train_end(e))):
        engine, _ = make_engine(world, erase_method="uce", uce_when=when)
        start = _key_value(engine)
        engine.objective.on_step_end(engine, 2)
        engine.objective.on_train_start(engine, 3)  # a resumed run does not edit "before" again
        assert all(torch.equal(start[n], p) for n, p in _key_value(engine).items())
        call(engine.objective, engine)
        assert all(not torch.equal(start[n], p) for n, p in _key_value(engine).items())


@pytest.mark.parametrize("targets", ["live", "cached"])
def test_preserve_prompts_ride_in_the_one_teacher_forward(world, targets):
    """Live: the preserve rows join the data and concept rows in the step's one teacher forward. Cached: their
    predictions are stored with the pool's, and the forward holds the data rows only."""
    import torch.nn.functional as F

    engine, solver = make_engine(world, method="bilevel", erase_method="esd-x", preserve=["a cat", "a house"],
                                 concept_batch_size=3, concept_targets=targets)
    assert engine.teacher_conditions == ("concept", "anchor", "preserve")
    shapes = []
    hook = engine.teacher.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape[0]))
    for step in range(4):
        shapes.clear()
        solver.step(step)
        assert len(shapes) == 1
    hook.remove()
    # data rows (+ concept rows under concept, anchor and preserve when live)
    assert shapes == [2 + 3 * 3] if targets == "live" else [2]
    concept = engine.sample_concept_batch()
    if targets == "cached":
        assert set(concept.teacher_predictions) == {"concept", "anchor", "preserve"}
        with torch.no_grad():
            live = engine.teacher(concept.latents, concept.timesteps,
                                  encoder_hidden_states=concept.conditions["preserve"]).sample
        torch.testing.assert_close(concept.teacher_predictions["preserve"], live, rtol=1e-4, atol=1e-5)
    teacher = engine.teacher_pass(None, concept, features=False)
    with torch.no_grad():
        total = engine.upper_loss(concept, teacher)
        esd = engine.objective.loss(engine.student(concept.latents, concept.timesteps,
                                                   encoder_hidden_states=concept.conditions["concept"]).sample,
                                    teacher.concept_predictions)
        held = F.mse_loss(engine.student(concept.latents, concept.timesteps,
                                         encoder_hidden_states=concept.conditions["preserve"]).sample,
                          teacher.concept_predictions["preserve"])
    torch.testing.assert_close(total, esd + held, rtol=1e-5, atol=1e-7)


def count_frozen_forwards(engine, solver, steps):
    calls = []
    hooks = [engine.teacher.register_forward_pre_hook(lambda *_: calls.append(1))]
    per_step, uppers = [], 0
    for step in range(steps):
        calls.clear()
        if getattr(solver, "reference", None) is None and hasattr(solver, "freeze_reference") \
                and step >= solver.distill_steps:
            solver.freeze_reference()
        if getattr(solver, "reference", None) is not None and len(hooks) == 1:
            hooks.append(solver.reference.register_forward_pre_hook(lambda *_: calls.append(1)))
        scalars = solver.step(step)
        assert all(torch.isfinite(torch.tensor(v)) for v in scalars.values()), scalars
        uppers += "loss/cu" in scalars
        per_step.append(len(calls))
    for hook in hooks:
        hook.remove()
    return per_step, uppers


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("erase_method", ERASE_METHODS)
def test_every_erase_method_with_every_solver(world, erase_method, method):
    engine, solver = make_engine(world, erase_method=erase_method, method=method, steps=2, two_stage_erase_steps=1,
                                 preserve=["a cat"], salun_batches=1)
    weights = snapshot(engine.student)
    per_step, uppers = count_frozen_forwards(engine, solver, 2)
    # bilevel carries the concept rows in every step; the others in one of these two
    assert uppers == {"distill-only": 0, "bilevel": 2}.get(method, 1)
    # one batched frozen forward per step; UCE's erase-only step needs none
    expected = [1, 0] if (method, erase_method) == ("two-stage", "uce") else [1, 1]
    assert per_step == expected
    assert any(not torch.equal(weights[n], p) for n, p in engine.student.named_parameters())


@pytest.mark.parametrize("erase_method", ["uce", "salun", "esd-x"])
def test_constraint_form_with_restricted_and_weight_space_objectives(world, erase_method):
    """The default constraint form trains with objectives that restrict the upper gradient (ESD-x, SalUn's mask)
    or have no latents (UCE): the student moves, the value model moves, and the multiplier is logged."""
    engine, solver = make_engine(world, erase_method=erase_method, method="bilevel", quality_tolerance=0.05,
                                 steps=2, preserve=["a cat"], salun_batches=1)
    weights, value = snapshot(engine.student), snapshot(solver.value_model.module)
    for step in range(2):
        scalars = solver.step(step)
    assert scalars["constraint/multiplier"] > 0 and "loss/cu" in scalars
    assert any(not torch.equal(weights[n], p) for n, p in engine.student.named_parameters())
    assert any(not torch.equal(value[n], p) for n, p in solver.value_model.module.named_parameters())


# ---- resume keeps an objective's state (SalUn's mask, UCE's reference), also for a BK student ----------------
def final_weights(out, step):
    from safetensors.torch import load_file

    return load_file(out / "checkpoints" / f"step-{step:08d}" / "student" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("erase_method,prune_method", [("salun", "magnitude"), ("uce", "bk-small")])
def test_resume_continues_bit_for_bit_with_objective_state(world, tmp_path, erase_method, prune_method):
    from safeprune_engine.api import train

    settings = dict(teacher="tiny", data=str(world["folder"].root), erase=["by monet"], erase_method=erase_method,
                    prune_method=prune_method, method="bilevel", bilevel_inner_steps=1, batch_size=2, resolution=16,
                    esd_pool_size=2, esd_ddim_steps=2, salun_batches=1, uce_when="every:2", progress=False, lr=1e-3,
                    checkpoint_every=2, kernels="off")  # auto's timing under load may pick other backends per run
    teacher = world["teacher"]
    straight = train(RunConfig(**settings, steps=4, out=str(tmp_path / "a")), teacher=teacher)
    train(RunConfig(**settings, steps=2, out=str(tmp_path / "b")), teacher=teacher)
    resumed = train(RunConfig(**settings, steps=4, out=str(tmp_path / "b"), resume="latest"), teacher=teacher)
    assert resumed.steps_run == 2
    a, b = final_weights(tmp_path / "a", 4), final_weights(tmp_path / "b", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    assert state["objective"] and all(isinstance(v, torch.Tensor) for v in state["objective"].values())
    if prune_method == "bk-small":
        assert type(resumed.student).__name__ == "UNet2DConditionModel"


# ---- configuration and plug-ins -------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    (dict(erase=["a", "b"], anchor=["x", "y", "z"]), "one per --erase"),
    (dict(erase_method="uce", uce_when="sometimes"), "uce-when"),
    (dict(erase_method="uce", uce_when="every:0"), "uce-when"),
    (dict(erase_method="salun", salun_base="salun"), "salun-base"),
    (dict(erase_method="salun", salun_topk=1.5), "salun-topk"),
    (dict(preserve=["  "]), "preserve"),
    (dict(prune_method="no-such-method"), "unknown prune method"),
    (dict(plugins=["no_such_module_anywhere"]), "cannot import"),
])
def test_bad_settings_are_refused(overrides, match):
    with pytest.raises(SafepruneError, match=match):
        RunConfig(**{"erase": ["by monet"], **overrides}).validate()


def test_cli_flags_for_multi_concept_and_new_methods():
    from safeprune_engine.cli import build_parser, run_config_from_args

    args = build_parser().parse_args(["run", "--erase", "by monet", "--anchor", "a painting", "--erase", "by picasso",
                                      "--anchor", "strip", "--preserve", "a cat", "--erase-method", "uce",
                                      "--uce-when", "every:50", "--prune-method", "bk-small"])
    config = run_config_from_args(args).validate()
    assert config.anchors == ["a painting", "strip"] and config.preserve == ["a cat"]
    assert (config.erase_method, config.uce_when, config.prune_method) == ("uce", "every:50", "bk-small")
    single = run_config_from_args(build_parser().parse_args(["run", "--erase", "x", "--anchor", "strip"]))
    assert single.anchor == "strip" and single.anchors == ["strip"]


def readme_example(file_name: str) -> str:
    """The README's code block that starts with `# <file_name>` (the documented plug-in example)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(block for block in blocks if block.startswith(f"# {file_name}"))


def test_the_readme_objective_plugin_runs(world, tmp_path, monkeypatch, request):
    import sys

    (tmp_path / "my_objectives.py").write_text(readme_example("my_objectives.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    OBJECTIVES.names()  # discover the built-ins first: the copy below must hold them
    monkeypatch.setattr(OBJECTIVES, "_entries", dict(OBJECTIVES._entries))  # the registration ends with the test
    request.addfinalizer(lambda: sys.modules.pop("my_objectives", None))
    engine, solver = make_engine(world, erase_method="anchor-match", plugins=["my_objectives"], steps=6,
                                 two_stage_erase_steps=5)
    assert type(engine.objective).__name__ == "AnchorMatch" and "anchor-match" in OBJECTIVES.names()
    solver.step(0)
    solver.freeze_reference()
    before, weights = engine.objective.evaluate(engine, reference=solver.reference), snapshot(engine.student)
    for step in range(1, 6):
        assert "loss/cu" in solver.step(step)
    assert engine.objective.evaluate(engine, reference=solver.reference) < before
    moved = {n for n, p in engine.student.named_parameters() if not torch.equal(weights[n], p.detach())}
    assert moved and all(".attn2." in n for n in moved)
