"""The shared-teacher step: one teacher forward per step, no encoder calls, and each solver updating exactly
the parameters it should. Real tiny diffusers models, real pruning, real latent cache."""
import pytest
import torch

from safeprune_engine.bilevel.engine import accumulate_gradients
from safeprune_engine.bilevel.solvers import build_solver
from safeprune_engine.config import RunConfig
from safeprune_engine.errors import SafepruneError
from safeprune_engine.data.imagefolder import ImageFolder
from safeprune_engine.models.teacher import bundle_from_pipeline
from safeprune_engine.prune.width import prune
from safeprune_engine.testing import tiny_pipeline, write_image_folder
from safeprune_engine.memory import optimizer_factory
from safeprune_engine.run.builder import build_engine

CAPTIONS = ["a red square", "a blue square", "a green square", "a yellow square"] * 2


def make_engine(tmp_path, method="bilevel", erase_method="esd-u", prediction_type="epsilon", **overrides):
    teacher = bundle_from_pipeline(tiny_pipeline(seed=0, prediction_type=prediction_type))
    student, _ = prune(teacher.unet, ratio=0.5)
    folder = ImageFolder(write_image_folder(tmp_path / "data", CAPTIONS, size=16))
    settings = dict(out=str(tmp_path / "run"), erase=["by monet"], method=method, erase_method=erase_method,
                    batch_size=2, concept_batch_size=2, resolution=16, steps=8, bilevel_inner_steps=1,
                    upper_every=2, two_stage_erase_steps=4, esd_pool_size=4, esd_ddim_steps=3, progress=False,
                    lr=1e-3, device="cpu")
    settings.update(overrides)
    config = RunConfig(**settings).validate()
    engine = build_engine(config, teacher, student, folder, tmp_path / "cache", latent_size=8, progress=False)
    return engine, build_solver(engine, config, optimizer_factory(config)), teacher


def count_calls(module, counter, key):
    def hook(*_):
        counter[key] = counter.get(key, 0) + 1

    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("method", ["bilevel", "alternating", "two-stage", "distill-only"])
def test_exactly_one_frozen_forward_per_step_and_no_encoders(tmp_path, method):
    """One teacher forward per training step (the constraint form's probe check adds its own, tested below)."""
    engine, solver, teacher = make_engine(tmp_path, method=method, quality_tolerance=None)
    calls = {}
    hooks = [count_calls(engine.teacher, calls, "teacher"), count_calls(teacher.vae.encoder, calls, "vae"),
             count_calls(teacher.text_encoder, calls, "text")]
    frozen_per_step, upper_steps = [], 0
    for step in range(8):
        calls.clear()
        reference_hook = None
        if method == "two-stage" and step >= 4:
            if solver.reference is None:
                solver.freeze_reference()
            reference_hook = count_calls(solver.reference, calls, "reference")
        scalars = solver.step(step)
        upper_steps += "loss/cu" in scalars
        frozen_per_step.append(calls.get("teacher", 0) + calls.get("reference", 0))
        assert calls.get("vae", 0) == 0 and calls.get("text", 0) == 0, f"step {step} ran an encoder: {calls}"
        if reference_hook is not None:
            reference_hook.remove()
    for hook in hooks:
        hook.remove()
    assert frozen_per_step == [1] * 8
    # every erasing method really took upper steps in this window (else the count above proves little)
    assert (upper_steps > 0) == (method != "distill-only")


def test_constraint_form_runs_the_teacher_on_the_probe_only_at_checks(tmp_path):
    """The constraint form: one teacher forward per step, plus one per probe batch every CHECK_EVERY steps."""
    from safeprune_engine.bilevel.solvers import CHECK_EVERY

    engine, solver, _ = make_engine(tmp_path, method="bilevel", quality_tolerance=0.05, steps=CHECK_EVERY + 2)
    calls = {}
    hook = count_calls(engine.teacher, calls, "teacher")
    per_step = []
    for step in range(CHECK_EVERY + 2):
        calls.clear()
        solver.step(step)
        per_step.append(calls.get("teacher", 0))
    hook.remove()
    checks = {0, CHECK_EVERY}
    assert per_step == [1 + len(solver.probe) if step in checks else 1 for step in range(CHECK_EVERY + 2)]


def test_teacher_pass_batches_data_and_concept_rows(tmp_path):
    # the concept and anchor conditions only (the preserve rows of --preserve-from-data are a third: tested below)
    engine, _, _ = make_engine(tmp_path, concept_targets="live")
    data, concept = engine.sample_data_batch(), engine.sample_concept_batch()
    assert concept.teacher_predictions is None
    shapes = []
    hook = engine.teacher.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(args[0].shape),
                                                    with_kwargs=True)
    out = engine.teacher_pass(data, concept)
    hook.remove()
    assert shapes == [torch.Size([2 + 2 * 2, 4, 8, 8])]
    # the batched rows equal separate forwards under each condition
    with torch.no_grad():
        alone = engine.teacher(concept.latents, concept.timesteps,
                               encoder_hidden_states=concept.conditions["anchor"]).sample
        data_alone = engine.teacher(data.latents, data.timesteps, encoder_hidden_states=data.text_emb).sample
    torch.testing.assert_close(out.concept_predictions["anchor"], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.data_prediction, data_alone, atol=1e-5, rtol=1e-4)
    # only the data rows' block outputs are kept, as copies (a view would keep all 6 rows alive)
    assert len(out.data_features) == 5 and all(f.shape[0] == 2 for f in out.data_features)
    assert all(not f.requires_grad for f in out.data_features)
    assert all(f.untyped_storage().nbytes() == f.numel() * f.element_size() for f in out.data_features)
    assert out.data_prediction.untyped_storage().nbytes() == out.data_prediction.numel() * 4
    # the taps keep nothing once the pass is over
    assert all(o is None for o in engine.teacher_taps.outputs)
    out.release_data()
    assert out.data_prediction is None and out.data_features == []


def test_cached_concept_targets_are_the_teachers_and_skip_its_concept_rows(tmp_path):
    """Cached targets (the default): the pool's stored predictions equal live teacher forwards on the same rows
    under each condition, and a step's teacher forward then holds the data rows only."""
    engine, _, _ = make_engine(tmp_path, preserve_from_data=8)
    assert engine.prompts.preserve  # --preserve-from-data holds fine-tuning captions too: a third condition
    assert len(engine.concepts) == 4  # every row of the trajectory pool (esd_pool_size 4, one prompt)
    data, concept = engine.sample_data_batch(), engine.sample_concept_batch()
    assert set(concept.teacher_predictions) == {"concept", "anchor", "preserve"}
    shapes = []
    hook = engine.teacher.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(args[0].shape),
                                                    with_kwargs=True)
    out = engine.teacher_pass(data, concept)
    hook.remove()
    assert shapes == [torch.Size([2, 4, 8, 8])]
    with torch.no_grad():
        for name in ("concept", "anchor", "preserve"):
            live = engine.teacher(concept.latents, concept.timesteps,
                                  encoder_hidden_states=concept.conditions[name]).sample
            torch.testing.assert_close(out.concept_predictions[name], live, atol=1e-5, rtol=1e-4)
    # another frozen model (two-stage's reference) never takes the teacher's stored predictions
    other = engine.teacher_pass(None, concept, features=False, model=engine.student)
    with torch.no_grad():
        student = engine.student(concept.latents, concept.timesteps,
                                 encoder_hidden_states=concept.conditions["anchor"]).sample
    torch.testing.assert_close(other.concept_predictions["anchor"], student, atol=1e-5, rtol=1e-4)


def test_v_prediction_target_is_velocity(tmp_path):
    engine, _, _ = make_engine(tmp_path, prediction_type="v_prediction")
    generator_state = engine.generator.get_state()
    sampler_state = engine.sampler.state_dict()
    batch = engine.sample_data_batch()
    # replay the same draws and rebuild the target by hand
    engine.generator.set_state(generator_state)
    engine.sampler.load_state_dict(sampler_state)
    index = engine.sampler.take(2)
    z0 = engine.data.sample_latents(index, engine.generator)
    noise = torch.randn(z0.shape, generator=engine.generator)
    t = torch.randint(0, 1000, (2,), generator=engine.generator)
    a = engine.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.target, a.sqrt() * noise - (1 - a).sqrt() * z0)


@pytest.mark.parametrize("method", ["distill-only", "bilevel"])
def test_caption_dropout_trains_rows_on_the_empty_caption(tmp_path, method):
    """--caption-dropout: about that fraction of rows carry the empty caption's embedding (and the teacher is run on
    the same rows), the others their own caption; the probe set drops the same way every time."""
    from safeprune_engine.data.cache import encode_prompts

    engine, _, teacher = make_engine(tmp_path, method=method, caption_dropout=0.5, batch_size=8, concept_batch_size=2)
    empty = encode_prompts(teacher, [""])[0]
    captions = engine.data.text_emb
    dropped = kept = 0
    for _ in range(8):
        batch = engine.sample_data_batch()
        for row in batch.text_emb:
            if torch.equal(row, empty):
                dropped += 1
            else:
                assert any(torch.equal(row, c) for c in captions)
                kept += 1
    assert 16 <= dropped <= 48 and dropped + kept == 64  # 32 expected; binomial(64, 0.5) stays well inside
    outputs = engine.teacher_pass(batch, None)
    with torch.no_grad():
        direct = engine.teacher(batch.latents.to(next(engine.teacher.parameters()).dtype), batch.timesteps,
                                encoder_hidden_states=batch.text_emb).sample
    torch.testing.assert_close(outputs.data_prediction.float(), direct.float(), rtol=1e-4, atol=1e-5)
    probe, again = engine.probe_batches(8, seed=3), engine.probe_batches(8, seed=3)
    assert all(torch.equal(a.text_emb, b.text_emb) for a, b in zip(probe, again))


def test_caption_dropout_draws_after_the_rows_and_is_validated(tmp_path):
    """The dropout draw comes after a batch's latents, noise and timesteps, so a run with it sees the same first
    batch of images as one without (and at 0 nothing is drawn: every row keeps its caption)."""
    plain, _, _ = make_engine(tmp_path / "a", method="distill-only", batch_size=8, caption_dropout=0.0)
    dropping, _, _ = make_engine(tmp_path / "b", method="distill-only", batch_size=8, caption_dropout=0.5)
    a, b = plain.sample_data_batch(), dropping.sample_data_batch()
    assert torch.equal(a.latents, b.latents) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(a.text_emb, b.text_emb)
    assert all(any(torch.equal(row, c) for c in plain.data.text_emb) for row in a.text_emb)
    for bad in (-0.1, 1.0):
        with pytest.raises(SafepruneError, match="caption-dropout"):
            RunConfig(caption_dropout=bad).validate()


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before, module):
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


@pytest.mark.parametrize("erase_method", ["esd-x", "esd-u"])
def test_erase_phase_changes_only_its_parameter_set(tmp_path, erase_method):
    engine, solver, _ = make_engine(tmp_path, method="two-stage", erase_method=erase_method)
    before = snapshot(engine.student)
    scalars = solver.step(5)  # past the 4 distill steps: a pure erase step
    assert "loss/cu" in scalars and "loss/ft" not in scalars
    moved = changed(before, engine.student)
    attn2 = {n for n in before if ".attn2." in n}
    assert moved, "the erase step changed nothing"
    if erase_method == "esd-x":
        assert moved <= attn2
        assert len(moved) >= len(attn2) // 2
    else:
        assert not moved & attn2
        assert len(moved) > len(attn2)


def test_upper_gradient_reaches_only_its_parameters(tmp_path):
    engine, _, _ = make_engine(tmp_path, erase_method="esd-x")
    concept = engine.sample_concept_batch()
    teacher = engine.teacher_pass(None, concept, features=False)
    loss = engine.upper_loss(concept, teacher)
    accumulate_gradients(loss, engine.upper_parameters())
    with_grad = {n for n, p in engine.student.named_parameters() if p.grad is not None}
    assert with_grad and all(".attn2." in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in engine.student.named_parameters() if n in with_grad
               and n.endswith(("to_k.weight", "to_v.weight")))


def draws(engine):
    """The engine's random state (data order, noise, timesteps): restoring it replays the same batches."""
    return engine.generator.get_state(), engine.sampler.state_dict()


def replay(engine, state):
    engine.generator.set_state(state[0])
    engine.sampler.load_state_dict(state[1])


def independent_gradients(engine, params, include_concept: bool):
    """d L_ft / d params and (with the concept rows) d L_cu / d params, by torch.autograd.grad on the batch the
    next solver step will draw (the engine's random state is put back afterwards); None where a loss does not
    reach a parameter. Nothing is written into .grad."""
    state = draws(engine)
    data = engine.sample_data_batch()
    concept = engine.sample_concept_batch() if include_concept else None
    teacher = engine.teacher_pass(data, concept, features=engine.config.w_feat > 0)
    lower = engine.lower_loss(data, teacher).total
    g_ft = torch.autograd.grad(lower, params, allow_unused=True, retain_graph=include_concept)
    g_cu = [None] * len(params)
    if include_concept:
        g_cu = torch.autograd.grad(engine.upper_loss(concept, teacher), params, allow_unused=True)
    replay(engine, state)
    return list(g_ft), list(g_cu)


def all_trainable(engine):
    """Every parameter of the student and of the feature projections (not the engine's own lists)."""
    return list(engine.student.parameters()) + list(engine.projections.parameters())


class RecordingAdamW(torch.optim.AdamW):
    """torch AdamW that logs (itself, every parameter's gradient) at each step, before updating."""

    log: list = []

    def step(self, closure=None):
        grads = {id(p): None if p.grad is None else p.grad.detach().clone()
                 for group in self.param_groups for p in group["params"]}
        RecordingAdamW.log.append((self, grads))
        return super().step(closure)


def recording_adamw(params, lr, role="lower"):
    return RecordingAdamW(params, lr=lr, foreach=False)


@pytest.mark.parametrize("method", ["distill-only", "alternating", "interleaved"])
def test_lower_steps_train_the_whole_student(tmp_path, method):
    """A lower step moves exactly the parameters L_ft reaches, each by torch AdamW's first update of
    d L_ft / d param (computed independently, on the same batch)."""
    engine, solver, _ = make_engine(tmp_path, method=method)
    params = all_trainable(engine)
    names = {id(p): n for n, p in engine.student.named_parameters()}
    g_ft, _ = independent_gradients(engine, params, include_concept=False)
    reached = {names[id(p)] for p, g in zip(params, g_ft) if id(p) in names and g is not None and g.any()}
    assert len(reached) >= 0.9 * len(names)  # L_ft reaches (nearly) the whole student
    # the reference update: a fresh torch AdamW with the solver's lr, stepped once on copies with those gradients
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for copy, grad in zip(copies, g_ft):
        copy.grad = grad
    torch.optim.AdamW(copies, lr=engine.config.lr, fused=True).step()  # what memory.adamw builds
    before = snapshot(engine.student)

    scalars = solver.step(0)  # a lower-only step for every method here
    assert "loss/cu" not in scalars
    assert reached <= changed(before, engine.student)
    for param, expected in zip(params, copies):
        torch.testing.assert_close(param.detach(), expected.detach(), rtol=0, atol=1e-7,
                                   msg=lambda m: f"{names.get(id(param), 'projection')}: {m}")


def test_interleaved_outer_step_mixes_upper_and_lower_gradients(tmp_path):
    """Inner steps step the lower optimizer on d L_ft; the outer step steps the outer optimizer (only) on
    lambda * d L_ft + d L_cu (the latter on the upper parameters only), each gradient computed independently on the
    same batch and teacher outputs."""
    lam = float(torch.empty(()).uniform_(0.5, 4.0))
    engine, _, _ = make_engine(tmp_path, method="interleaved", bilevel_inner_steps=1, bilevel_lambda=lam)
    solver = build_solver(engine, engine.config, make_optimizer=recording_adamw)
    params = all_trainable(engine)
    upper = {id(p) for p in engine.upper_parameters()}
    RecordingAdamW.log = []

    g_ft, _ = independent_gradients(engine, params, include_concept=False)
    solver.step(0)  # inner
    (optimizer, seen), = RecordingAdamW.log
    assert optimizer is solver.optimizers["lower"]
    for param, grad in zip(params, g_ft):
        got = seen[id(param)]
        assert (got is None) == (grad is None)
        if grad is not None:
            torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-8)

    RecordingAdamW.log = []
    g_ft, g_cu = independent_gradients(engine, params, include_concept=True)
    assert any(g is not None and g.any() for p, g in zip(params, g_cu) if id(p) in upper)
    # L_cu also reaches parameters outside the upper set (ESD-u: attn2), which must get no share of it
    assert any(g is not None and g.any() for p, g in zip(params, g_cu) if id(p) not in upper)
    g_cu = [g if id(p) in upper else None for p, g in zip(params, g_cu)]
    scalars = solver.step(1)  # outer
    assert "loss/cu" in scalars
    (optimizer, seen), = RecordingAdamW.log  # one optimizer step, and it is the outer one
    assert optimizer is solver.optimizers["outer"]
    for param, ft, cu in zip(params, g_ft, g_cu):
        expected = sum(g for g in (None if ft is None else lam * ft, cu) if g is not None)
        torch.testing.assert_close(seen[id(param)], expected, rtol=1e-5, atol=1e-7)  # oneDNN threads reorder sums


def expected_penalty_gradients(engine, params, lam):
    """lambda * d L_ft + d L_cu (the latter on the upper parameters only) on the batch the next step draws."""
    upper = {id(p) for p in engine.upper_parameters()}
    g_ft, g_cu = independent_gradients(engine, params, include_concept=True)
    g_cu = [g if id(p) in upper else None for p, g in zip(params, g_cu)]
    return [sum(g for g in (None if ft is None else lam * ft, cu) if g is not None) for ft, cu in zip(g_ft, g_cu)]


def assert_gradients(seen, params, expected, rtol=1e-5, atol=1e-7):
    reached = 0
    for param, want in zip(params, expected):
        if isinstance(want, int):  # no loss reaches it
            assert seen[id(param)] is None or not seen[id(param)].any()
            continue
        reached += 1
        torch.testing.assert_close(seen[id(param)], want, rtol=rtol, atol=atol)  # oneDNN threads reorder sums
    assert reached > 0.9 * len(params)


def test_bilevel_penalty_every_step_follows_upper_plus_lambda_lower(tmp_path):
    """The paper's penalty method: EVERY student step is one step of one optimizer on d L_cu + lambda d L_ft (the
    upper part on the upper parameters only), on the same batch and teacher outputs; no value model is kept."""
    lam = float(torch.empty(()).uniform_(0.5, 4.0))
    engine, _, _ = make_engine(tmp_path, method="bilevel", bilevel_lambda=lam, quality_tolerance=None)
    solver = build_solver(engine, engine.config, make_optimizer=recording_adamw)
    assert set(solver.optimizers) == {"student"} and solver.value_model is None
    params = all_trainable(engine)
    for iteration in range(2):
        expected = expected_penalty_gradients(engine, params, lam)
        RecordingAdamW.log = []
        scalars = solver.step(iteration)
        (optimizer, seen), = RecordingAdamW.log
        assert optimizer is solver.optimizers["student"]
        assert_gradients(seen, params, expected)
        assert {"loss/ft", "loss/cu"} <= set(scalars) and scalars["penalty/lambda"] == pytest.approx(lam)


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_bilevel_constraint_form_value_model_and_multiplier(tmp_path, inner_steps):
    """--quality-tolerance: the multiplier takes a dual-ascent step from L_ft of the student and of the value model
    on the fixed probe set; the value model (a copy of the student) then takes K steps on its own L_ft, the first on
    the outer step's batch and teacher outputs; the student follows (d L_cu + mu d L_ft) / (1 + mu) with the
    updated mu."""
    from safeprune_engine.bilevel.constraint import DualMultiplier

    lam0 = 2.0
    engine, _, _ = make_engine(tmp_path, method="bilevel", bilevel_lambda=lam0, quality_tolerance=0.05,
                               bilevel_inner_steps=inner_steps)
    solver = build_solver(engine, engine.config, make_optimizer=recording_adamw)
    value = solver.value_model
    assert value.module is not engine.student and set(solver.optimizers) == {"student"}
    for (name, a), b in zip(engine.student.state_dict().items(), value.module.state_dict().values()):
        assert torch.equal(a, b), name  # it starts where the student starts
    params = all_trainable(engine)

    with torch.no_grad():
        losses = [0.0, 0.0]
        for batch in solver.probe:
            teacher = engine.teacher_pass(batch, None)
            for i, model in enumerate((None, value)):
                losses[i] += float(engine.lower_loss(batch, teacher, model=model).total) * batch.latents.shape[0]
    rows = sum(batch.latents.shape[0] for batch in solver.probe)
    reference = DualMultiplier(0.05, lam0)
    reference.update(losses[0] / rows, losses[1] / rows)
    assert reference.multiplier < lam0  # identical models: full slack, the multiplier goes down

    state = draws(engine)
    data = engine.sample_data_batch()
    concept = engine.sample_concept_batch()
    teacher = engine.teacher_pass(data, concept, features=True)
    value_loss = engine.lower_loss(data, teacher, model=value).total
    value_grads = torch.autograd.grad(value_loss, value.parameters(), allow_unused=True)
    replay(engine, state)
    # value steps after the first draw batches of their own, after the student's draw: the student's gradients are
    # those of the first draw
    mu = reference.multiplier  # the constraint form steps on (d L_cu + mu d L_ft) / (1 + mu)
    expected = [g if isinstance(g, int) else g / (1 + mu) for g in expected_penalty_gradients(engine, params, mu)]
    RecordingAdamW.log = []
    scalars = solver.step(0)
    optimizers = [optimizer for optimizer, _ in RecordingAdamW.log]
    assert optimizers == [solver.value_optimizer] * inner_steps + [solver.optimizers["student"]]
    first_value_step = RecordingAdamW.log[0][1]
    for param, grad in zip(value.parameters(), value_grads):
        if grad is not None:
            torch.testing.assert_close(first_value_step[id(param)], grad, rtol=1e-5, atol=1e-8)
    assert_gradients(RecordingAdamW.log[-1][1], params, expected)
    assert scalars["constraint/multiplier"] == pytest.approx(reference.multiplier)
    assert scalars["constraint/slack"] == pytest.approx(reference.slack)
    assert scalars["loss/ft_value"] == pytest.approx(float(value_loss.detach()), rel=1e-5)


def test_probe_batches_are_fixed_and_spread_over_the_schedule(tmp_path):
    """The constraint's probe set: the same rows for the same seed, timesteps evenly spread over the schedule, and
    drawing it leaves the run's own random stream untouched."""
    engine, _, _ = make_engine(tmp_path, method="distill-only")
    before = engine.generator.get_state()
    first, again = engine.probe_batches(6, seed=3), engine.probe_batches(6, seed=3)
    assert torch.equal(engine.generator.get_state(), before)
    assert [b.latents.shape[0] for b in first] == [2, 2, 2]  # batches of batch_size
    timesteps = torch.cat([b.timesteps for b in first])
    assert timesteps.tolist() == sorted(timesteps.tolist()) and timesteps[0] < 100 and timesteps[-1] > 900
    for a, b in zip(first, again):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.target, b.target)
    assert not torch.equal(first[0].latents, engine.probe_batches(6, seed=4)[0].latents)


def test_dual_multiplier_moves_on_a_log_scale_toward_the_tolerance():
    """Dual ascent on log mu: up while the smoothed ratio exceeds 1 + tol, down while it is below, by rate x the
    violation in units of the tolerance (clipped to [-1, 1]), within [mu0 / 1e3, mu0 * 1e3]."""
    import math

    from safeprune_engine.bilevel.constraint import DualMultiplier

    dual = DualMultiplier(tolerance=0.1, initial=5.0, rate=0.05, smoothing=0.0)
    dual.update(1.2, 1.0)  # ratio 1.2: violated by the tolerance's own size
    assert dual.multiplier == pytest.approx(5.0 * math.exp(0.05))
    assert dual.slack == pytest.approx(-0.1)
    dual.update(1.0, 1.0)  # ratio 1.0: full slack -> down by one unit
    assert dual.multiplier == pytest.approx(5.0)
    dual.update(1.15, 1.0)  # half a unit
    assert dual.multiplier == pytest.approx(5.0 * math.exp(0.025))
    dual.update(10.0, 1.0)  # a huge violation is clipped to 1 unit
    assert dual.multiplier == pytest.approx(5.0 * math.exp(0.075))
    for _ in range(1000):
        dual.update(0.5, 1.0)
    assert dual.multiplier == pytest.approx(5.0 / 1e3)  # the lower bound
    smooth = DualMultiplier(tolerance=0.1, initial=1.0, smoothing=0.9)
    smooth.update(1.0, 1.0)
    smooth.update(2.0, 1.0)
    assert smooth.scalars()["constraint/ratio"] == pytest.approx(1.1)
    restored = DualMultiplier(tolerance=0.1, initial=1.0)
    restored.load_state_dict(smooth.state_dict())
    assert (restored.multiplier, restored.ratio_ema) == pytest.approx((smooth.multiplier, smooth.ratio_ema))


def test_bilevel_refuses_checkpoints_of_the_interleaved_scheme(tmp_path):
    """A checkpoint of the earlier scheme (lower + outer optimizers) names the method that resumes it; a constraint-
    form checkpoint does not load into a penalty-form run."""
    engine, solver, _ = make_engine(tmp_path, method="bilevel", quality_tolerance=None)
    with pytest.raises(SafepruneError, match="--method interleaved"):
        solver.load_state_dict({"optimizers": {"lower": {}, "outer": {}}, "scaler": {}})
    _, constrained, _ = make_engine(tmp_path / "c", method="bilevel", quality_tolerance=0.1)
    with pytest.raises(SafepruneError, match="quality-tolerance"):
        solver.load_state_dict(constrained.state_dict())


def test_alternating_upper_optimizer_has_its_own_learning_rate(tmp_path):
    _, solver, _ = make_engine(tmp_path, method="alternating", lr=1e-4)
    assert solver.optimizers["lower"].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert solver.optimizers["upper"].param_groups[0]["lr"] == pytest.approx(5e-4)
    lower_ids = {id(p) for p in solver.optimizers["lower"].param_groups[0]["params"]}
    upper_ids = {id(p) for p in solver.optimizers["upper"].param_groups[0]["params"]}
    assert upper_ids < lower_ids  # same weights, the upper set a strict subset (ESD-u: no attn2)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_runs_teacher_in_training_dtype(tmp_path, precision, dtype):
    engine, solver, _ = make_engine(tmp_path, method="alternating", mixed_precision=precision)
    assert next(engine.teacher.parameters()).dtype == dtype
    assert next(engine.student.parameters()).dtype == torch.float32  # fp32 master weights
    data, concept = engine.sample_data_batch(), engine.sample_concept_batch()
    out = engine.teacher_pass(data, concept)
    assert out.data_prediction.dtype == dtype and out.data_features[0].dtype == dtype
    assert solver.scaler.is_enabled() == (precision == "fp16")
    before = snapshot(engine.student)
    for step in range(2):
        scalars = solver.step(step)
        assert all(torch.isfinite(torch.tensor(v)) for v in scalars.values())
    assert changed(before, engine.student)


def test_concept_images_with_stripped_anchor(tmp_path):
    concept_dir = write_image_folder(tmp_path / "concept", ["a red square by monet", "a blue circle by Monet"],
                                     size=16)
    engine, solver, teacher = make_engine(tmp_path, method="alternating", erase_data=str(concept_dir),
                                          anchor="strip", concept_targets="live")
    from safeprune_engine.data.cache import encode_prompts
    from safeprune_engine.unlearn.sources import ImageConceptSource

    assert isinstance(engine.concepts, ImageConceptSource)
    expected_anchor = encode_prompts(teacher, ["a red square", "a blue circle"])
    torch.testing.assert_close(engine.concepts.anchor_emb, expected_anchor)
    expected_concept = encode_prompts(teacher, ["a red square by monet", "a blue circle by Monet"])
    torch.testing.assert_close(engine.concepts.concept_emb, expected_concept)
    scalars = solver.step(1)  # upper_every=2 -> iteration 1 is an upper step
    assert "loss/cu" in scalars


def test_trajectory_pool_is_sampled_once_and_reused(tmp_path, monkeypatch):
    engine, _, _ = make_engine(tmp_path, method="bilevel")
    pool_files = list((tmp_path / "cache").glob("esd-pool-*.safetensors"))
    assert len(pool_files) == 1
    pool = engine.concepts
    assert len(pool) == 4 and pool.timesteps.min() >= 0 and pool.timesteps.max() < 1000
    assert pool.latents.std() > 0.1  # real latents, not zeros

    from safeprune_engine.unlearn import sources

    def refuse(*args, **kwargs):
        raise AssertionError("the pool was sampled again although a matching one was stored")

    monkeypatch.setattr(sources, "sample_trajectory_pool", refuse)
    again, _, _ = make_engine(tmp_path, method="bilevel")
    assert torch.equal(again.concepts.latents, pool.latents)


def test_feature_projections_when_student_block_widths_differ(tmp_path):
    from safeprune_engine.testing import tiny_unet

    teacher = bundle_from_pipeline(tiny_pipeline(seed=0))
    student = tiny_unet(seed=1, block_out_channels=(16, 32), norm_num_groups=4)
    folder = ImageFolder(write_image_folder(tmp_path / "data", CAPTIONS, size=16))
    config = RunConfig(out=str(tmp_path / "run"), method="distill-only", batch_size=2, resolution=16,
                       progress=False, device="cpu").validate()
    engine = build_engine(config, teacher, student, folder, tmp_path / "cache", latent_size=8, progress=False)
    assert len(engine.projections.projections) == 5  # every tapped block differs in width
    solver = build_solver(engine, config)
    before = {n: p.detach().clone() for n, p in engine.projections.named_parameters()}
    solver.step(0)
    assert all(not torch.equal(before[n], p) for n, p in engine.projections.named_parameters())


def test_trajectory_prompts_with_stripped_anchor(tmp_path):
    from safeprune_engine.data.cache import encode_prompts

    prompts = ["a red square by monet", "a blue square by Monet"]
    engine, _, teacher = make_engine(tmp_path, erase_prompts=prompts, anchor="strip", esd_pool_size=2,
                                     concept_targets="live")
    pool = engine.concepts
    assert sorted(pool.concept_index.tolist()) == [0, 0, 1, 1]  # esd_pool_size trajectories per prompt
    torch.testing.assert_close(pool.concept_emb, encode_prompts(teacher, prompts))
    torch.testing.assert_close(pool.anchor_emb, encode_prompts(teacher, ["a red square", "a blue square"]))


@pytest.mark.parametrize("preserve", [False, True])
def test_joint_forward_step_has_the_same_gradient(tmp_path, preserve):
    """--bilevel-joint-forward (ESD on the whole student): one student forward over [data | concept (| preserve)]
    rows and one backward give the student's optimizer lambda * d L_ft + d L_cu, as two separate passes do, and the
    same loss values; an objective with a restricted parameter set is refused."""
    lam = float(torch.empty(()).uniform_(0.5, 4.0))
    extra = dict(preserve=["a photo"], preserve_weight=0.5) if preserve else {}
    engine, _, _ = make_engine(tmp_path, method="bilevel", erase_method="esd", bilevel_inner_steps=1,
                               bilevel_lambda=lam, bilevel_joint_forward=True, quality_tolerance=None, **extra)
    assert engine.joint_forward_possible
    solver = build_solver(engine, engine.config, make_optimizer=recording_adamw)
    params = all_trainable(engine)
    solver.step(0)
    g_ft, g_cu = independent_gradients(engine, params, include_concept=True)
    RecordingAdamW.log = []
    scalars = solver.step(1)
    (optimizer, seen), = RecordingAdamW.log
    assert optimizer is solver.optimizers["student"]
    reached = 0
    for param, ft, cu in zip(params, g_ft, g_cu):
        expected = sum(g for g in (None if ft is None else lam * ft, cu) if g is not None)
        if isinstance(expected, int):  # neither loss reaches it
            assert seen[id(param)] is None or not seen[id(param)].any()
            continue
        reached += 1
        torch.testing.assert_close(seen[id(param)], expected, rtol=1e-4, atol=1e-6)
    assert reached > 0.9 * len(params)
    assert {"loss/ft", "loss/cu"} <= set(scalars)

    with pytest.raises(SafepruneError, match="whole student"):
        other, _, _ = make_engine(tmp_path / "u", method="bilevel", erase_method="esd-u", bilevel_joint_forward=True)
        build_solver(other, other.config)
