"""`calibrating_step` / `CalibrateOnFirstStep`: calibration from the first training step's own passes, checked against
`calibrate()` on the same batch followed by an ordinary autograd step with the calibrated adapter in place."""

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import peft_graft
from peft_graft import (
    CalibrateOnFirstSteps,
    CalibratingSteps,
    CalibrationRequiredError,
    GraftConfig,
    GraftConfigError,
    GraftLayer,
    NonFiniteCalibrationError,
)


TARGETS = ["q_proj", "v_proj", "down_proj"]


def batch(seed=3, rows=2):
    ids = torch.randint(0, 128, (rows, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def graft(tiny_llama, **kwargs):
    return get_peft_model(tiny_llama(), GraftConfig(**{"r": 4, "target_modules": TARGETS, **kwargs}))


def layers(model):
    return [m for m in model.modules() if isinstance(m, GraftLayer)]


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(actual, expected, name):
    """Equal up to float32 rounding of sums over tokens, relative to the tensor's largest entry."""
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4, msg=name)


def reference_grads(tiny_llama, micro_batches, **kwargs):
    """`calibrate()` on the micro-batches, then their loss backpropagated through the calibrated adapter."""
    model = graft(tiny_llama, **kwargs)
    peft_graft.calibrate(model, micro_batches, progress=False)
    for b in micro_batches:
        model(**b).loss.backward()
    return model, adapter_grads(model)


CONFIGS = {
    "gradient": dict(projection="gradient"),
    "activation": dict(projection="activation"),
    "output-mode": dict(projection="gradient", mode="output"),
    "diagonal-phi": dict(projection="gradient", phi="diagonal"),
    "lowrank-phi": dict(projection="gradient", phi="lowrank", phi_rank=2),
    "sparse-residual": dict(projection="svd", sparse_residual=6),
}


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("micro", [1, 2], ids=["one-batch", "accumulated"])
def test_first_step_equals_calibrating_first_then_stepping(tiny_llama, kwargs, micro):
    micro_batches = [batch(seed) for seed in range(3, 3 + micro)]
    reference, expected = reference_grads(tiny_llama, micro_batches, **kwargs)
    model = graft(tiny_llama, **kwargs)
    model.train()
    with peft_graft.calibrating_step(model):
        for b in micro_batches:
            model(**b).loss.backward()
    grads = adapter_grads(model)
    assert grads.keys() == expected.keys()
    assert any(g.abs().max() > 0 for g in grads.values())
    for name, grad in grads.items():
        assert_close(grad, expected[name], name)
    for mine, ref in zip(layers(model), layers(reference), strict=True):
        assert not mine.graft_recorders and not mine.graft_pending["default"]
        torch.testing.assert_close(mine.graft_proj["default"].A, ref.graft_proj["default"].A, atol=1e-5, rtol=0)
        if "default" in mine.graft_sparse:
            assert torch.equal(mine.graft_sparse["default"].rows, ref.graft_sparse["default"].rows)


def test_the_step_after_it_is_an_ordinary_training_step(tiny_llama):
    model = graft(tiny_llama, projection="gradient")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with peft_graft.calibrating_step(model):
        first = model(**batch()).loss
        first.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = model(**batch()).loss
    assert after < first.detach() - 1e-3  # the recorded gradient, applied in the new subspace, lowers that batch's loss
    model(**batch(4)).loss.backward()  # and the adapter now trains like any other
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_max_grad_norm_clips_the_adapter_gradients(tiny_llama):
    _, expected = reference_grads(tiny_llama, [batch()], projection="gradient")
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()])).item()
    model = graft(tiny_llama, projection="gradient")
    with peft_graft.calibrating_step(model, max_grad_norm=norm / 4):
        model(**batch()).loss.backward()
    clipped = adapter_grads(model)
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped.values()])).item()
    assert total == pytest.approx(norm / 4, rel=1e-4)
    for name, grad in clipped.items():
        assert_close(grad * 4, expected[name], name)


def pending(model):
    return all(layer.graft_pending["default"] for layer in layers(model))


def test_a_graft_that_does_not_start_at_zero_is_refused_before_anything_runs(tiny_llama):
    model = graft(tiny_llama, projection="gradient", init_weights="lstsq")
    with pytest.raises(GraftConfigError, match="init_weights=True"), peft_graft.calibrating_step(model):
        pytest.fail("the block must not run")
    assert pending(model) and not any(layer.graft_recorders for layer in layers(model))


def test_nothing_to_calibrate_is_an_error(tiny_llama):
    model = graft(tiny_llama, projection="orthogonal")
    with pytest.raises(GraftConfigError, match="nothing left to calibrate"), peft_graft.calibrating_step(model):
        pytest.fail("the block must not run")


def test_a_block_without_backward_leaves_the_adapter_uncalibrated(tiny_llama):
    model = graft(tiny_llama, projection="gradient")
    with torch.no_grad():  # a forward without backward records no gradient
        step = peft_graft.calibrating_step(model).__enter__()
        model(**batch())
    with pytest.raises(CalibrationRequiredError, match="loss.backward"):
        step.__exit__(None, None, None)
    assert pending(model) and not any(layer.graft_recorders for layer in layers(model))
    with pytest.raises(CalibrationRequiredError, match="calibrating_step"):
        model(**batch())


def test_an_error_inside_the_block_changes_nothing(tiny_llama):
    model = graft(tiny_llama, projection="gradient")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), peft_graft.calibrating_step(model):
        model(**batch()).loss.backward()
        raise RuntimeError("boom")
    assert pending(model) and not any(layer.graft_recorders for layer in layers(model))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)


def trainer_run(tiny_llama, tmp_path, callbacks, calibrate_first, model=None):
    """One Trainer step (two accumulated micro-batches, clipped, SGD so the step is linear in the gradient)."""
    ids = batch(rows=1)["input_ids"].repeat(4, 1)  # one sequence four times: every shuffle gives the same batches
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = model or graft(tiny_llama, projection="gradient")
    if calibrate_first:
        peft_graft.calibrate(model, [{"input_ids": ids, "labels": ids}], progress=False)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        optim="sgd", learning_rate=1.0, max_grad_norm=0.01, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    return model


def test_trainer_callback_takes_the_step_of_an_adapter_calibrated_beforehand(tiny_llama, tmp_path):
    with pytest.raises(CalibrationRequiredError):
        trainer_run(tiny_llama, tmp_path, [], calibrate_first=False)
    model = trainer_run(tiny_llama, tmp_path, [CalibrateOnFirstSteps()], calibrate_first=False)
    reference = trainer_run(tiny_llama, tmp_path, [], calibrate_first=True)
    mine, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    trained = [n for n, p in mine.items() if p.requires_grad]
    assert trained and all(mine[n].abs().max() > 0 for n in trained)
    for name in trained:
        assert_close(mine[name], ref[name], name)
    for a, b in zip(layers(model), layers(reference), strict=True):
        torch.testing.assert_close(a.graft_proj["default"].B, b.graft_proj["default"].B, atol=1e-5, rtol=0)


def test_trainer_callback_after_a_failed_first_step_starts_afresh(tiny_llama, tmp_path):
    model, callback = graft(tiny_llama, projection="gradient"), CalibrateOnFirstSteps()
    hook = poisoned(model)
    with pytest.raises(NonFiniteCalibrationError):
        trainer_run(tiny_llama, tmp_path, [callback], calibrate_first=False, model=model)
    hook.remove()
    assert pending(model) and not any(layer.graft_recorders for layer in layers(model))
    trainer_run(tiny_llama, tmp_path, [callback], calibrate_first=False, model=model)
    reference = trainer_run(tiny_llama, tmp_path, [], calibrate_first=True)
    mine, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in (n for n, p in mine.items() if p.requires_grad):
        assert_close(mine[name], ref[name], name)  # nothing of the failed attempt left in the statistics


def test_trainer_callback_leaves_a_calibrated_adapter_alone(tiny_llama, tmp_path):
    model = trainer_run(tiny_llama, tmp_path, [CalibrateOnFirstSteps()], calibrate_first=True)
    assert not any(layer.graft_recorders for layer in layers(model))


def poisoned(model):
    """A NaN after the last decoder layer: the loss and every recorded gradient become NaN."""
    return model.base_model.model.model.layers[-1].register_forward_hook(lambda m, args, out: out * float("nan"))


def test_a_non_finite_step_calibrates_nothing(tiny_llama):
    model = graft(tiny_llama, projection="gradient")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    hook = poisoned(model)
    with pytest.raises(NonFiniteCalibrationError, match="NaN/Inf"), peft_graft.calibrating_step(model):
        model(**batch()).loss.backward()
    hook.remove()
    assert pending(model) and not any(layer.graft_recorders for layer in layers(model))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)
    with peft_graft.calibrating_step(model):  # a finite step afterwards calibrates as usual
        model(**batch()).loss.backward()
    assert not pending(model)


def test_calibrate_on_non_finite_data_calibrates_nothing(tiny_llama):
    model = graft(tiny_llama, projection="gradient")
    hook = poisoned(model)
    with pytest.raises(NonFiniteCalibrationError, match="Nothing was calibrated"):
        peft_graft.calibrate(model, [batch()], progress=False)
    hook.remove()
    assert pending(model) and not any(layer.graft_recorders for layer in layers(model))


def subspace_gap(X, Y):
    """‖P_X − P_Y‖ for matrices with orthonormal columns."""
    return torch.linalg.matrix_norm(X @ X.T - Y @ Y.T, ord=2).item()


def graft_with_weight_gradients(tiny_llama):
    """A gradient-projection graft whose base weights record their own gradients (W.grad = dL/dW, the gradient at
    the effective weight W + ΔW: the references the calibrating steps must match), and Adam over the Φs."""
    model = graft(tiny_llama, projection="gradient")
    targets = {layer: layer.get_base_layer().weight for layer in layers(model)}
    for weight in targets.values():
        weight.requires_grad_(True)
    phis = [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and p.shape[0] == 4]
    return model, targets, torch.optim.Adam(phis, lr=0.05)


def snapshot(targets):
    """(A, B, Φ) of each graft layer, copied."""
    return {layer: (layer.graft_proj["default"].A.clone(), layer.graft_proj["default"].B.clone(),
                    layer.graft_phi["default"].weight.detach().clone()) for layer in targets}


def assert_moved_to(layer, summed, step_grad, before, optimizer):
    """The projections span the top-r subspaces of ``summed``, Φ is the old ΔW in the new basis, its gradient is
    ``step_grad`` in that basis, and Adam's state for Φ is dropped."""
    A, B, phi = before
    U, _, Vh = torch.linalg.svd(summed.double())
    new_A, new_B = layer.graft_proj["default"].A, layer.graft_proj["default"].B
    assert subspace_gap(new_A, U[:, :4].float()) < 1e-3 and subspace_gap(new_B.T, Vh[:4].T.float()) < 1e-3
    assert subspace_gap(new_A, A) > 1e-2  # it moved
    weight = layer.graft_phi["default"].weight
    assert_close(weight.detach(), new_A.T @ (A @ phi @ B) @ new_B.T, layer.module_name)
    assert_close(weight.grad, layer.graft_scaling["default"] * new_A.T @ step_grad @ new_B.T, layer.module_name)
    assert weight not in optimizer.state


def test_refining_steps_follow_the_summed_gradient(tiny_llama):
    """Step 2 of CalibratingSteps(steps=2), against references from autograd on the base weights themselves: the
    projections span the top-r subspaces of G₁ + G₂, Φ is the old ΔW in the new basis, its gradient is G₂ in that
    basis, and Adam's state for Φ is dropped."""
    model, targets, optimizer = graft_with_weight_gradients(tiny_llama)
    calibration = CalibratingSteps(model, steps=2)
    with calibration.step(optimizer):
        model(**batch(3)).loss.backward()
    optimizer.step()
    first, before = {layer: w.grad.clone() for layer, w in targets.items()}, snapshot(targets)
    for w in targets.values():
        w.grad = None
    optimizer.zero_grad()
    with calibration.step(optimizer):
        model(**batch(4)).loss.backward()
    assert calibration.finished and not any(layer.graft_recorders for layer in targets)
    for layer, w in targets.items():
        assert_moved_to(layer, first[layer] + w.grad, w.grad, before[layer], optimizer)
    with calibration.step(optimizer):  # finished: an ordinary step, nothing recorded
        assert not any(layer.graft_recorders for layer in targets)


def test_refining_once_at_the_end_sums_every_step_and_solves_once(tiny_llama):
    """CalibratingSteps(steps=3, refine_each_step=False): step 2 leaves the projections, Φ's autograd gradient and
    Adam's state alone; step 3 moves the projections to the top-r subspaces of G₁ + G₂ + G₃ (from autograd on the
    base weights), carries Φ over and gives it G₃ in the new basis."""
    model, targets, optimizer = graft_with_weight_gradients(tiny_llama)
    calibration = CalibratingSteps(model, steps=3, refine_each_step=False)
    sums = {}
    for seed in (3, 4, 5):
        before = snapshot(targets)
        with calibration.step(optimizer):
            model(**batch(seed)).loss.backward()
        for layer, w in targets.items():
            sums[layer] = w.grad.clone() if layer not in sums else sums[layer] + w.grad
        if seed == 4:  # the middle step: an ordinary step in step 1's basis
            for layer, (A, B, _) in before.items():
                weight = layer.graft_phi["default"].weight
                assert torch.equal(layer.graft_proj["default"].A, A) and torch.equal(layer.graft_proj["default"].B, B)
                assert_close(weight.grad, layer.graft_scaling["default"] * A.T @ targets[layer].grad @ B.T,
                             layer.module_name)
                assert weight in optimizer.state
        if seed != 5:
            optimizer.step()
            optimizer.zero_grad()
            for w in targets.values():
                w.grad = None
    assert calibration.finished and not any(layer.graft_recorders for layer in targets)
    for layer, w in targets.items():
        assert_moved_to(layer, sums[layer], w.grad, before[layer], optimizer)


def test_refining_needs_a_dense_phi_and_the_optimizer(tiny_llama):
    with pytest.raises(GraftConfigError, match="phi='dense'"):
        CalibratingSteps(graft(tiny_llama, projection="gradient", phi="diagonal"), steps=2)
    with pytest.raises(GraftConfigError, match="positive integer"):
        CalibratingSteps(graft(tiny_llama, projection="gradient"), steps=0)
    with pytest.raises(GraftConfigError, match="True or False"):
        CalibratingSteps(graft(tiny_llama, projection="gradient"), steps=3, refine_each_step="last")
    calibration = CalibratingSteps(graft(tiny_llama, projection="gradient"), steps=2)
    with calibration.step():
        calibration.model(**batch()).loss.backward()
    with pytest.raises(GraftConfigError, match="pass the optimizer"):
        calibration.step()


def test_a_non_finite_refining_step_changes_nothing(tiny_llama):
    model = graft(tiny_llama, projection="gradient")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    calibration = CalibratingSteps(model, steps=2)
    with calibration.step(optimizer):
        model(**batch()).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    hook = poisoned(model)
    with pytest.raises(NonFiniteCalibrationError), calibration.step(optimizer):
        model(**batch(4)).loss.backward()
    hook.remove()
    assert calibration.done == 1 and not any(layer.graft_recorders for layer in layers(model))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("steps, refine_each_step", [(2, True), (3, False)], ids=["each-step", "at-the-end"])
def test_trainer_callback_refines_like_the_manual_loop(tiny_llama, tmp_path, steps, refine_each_step):
    ids = batch(rows=1)["input_ids"].repeat(4, 1)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps + 1, per_device_train_batch_size=4, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.01, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trained = graft(tiny_llama, projection="gradient")
    callback = CalibrateOnFirstSteps(steps=steps, refine_each_step=refine_each_step)
    Trainer(model=trained, args=args, train_dataset=data, callbacks=[callback]).train()

    model = graft(tiny_llama, projection="gradient")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    calibration = CalibratingSteps(model, steps=steps, refine_each_step=refine_each_step)
    for _ in range(steps + 1):
        with calibration.step(optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.01)
        optimizer.step()
        optimizer.zero_grad()
    mine, ref = dict(trained.named_parameters()), dict(model.named_parameters())
    # Steps that keep autograd's gradients (those between the first and last calibrating step when refining at the
    # end) differ from the manual loop's by Trainer's loss rounding: 6e-5 of the largest entry after them, measured.
    tolerance, projection_tolerance = (1e-5, 1e-5) if refine_each_step else (3e-4, 1e-4)
    for name in (n for n, p in ref.items() if p.requires_grad):
        peak = ref[name].abs().max().item()
        torch.testing.assert_close(mine[name], ref[name], atol=tolerance * peak, rtol=1e-4, msg=name)
    for a, b in zip(layers(trained), layers(model), strict=True):
        torch.testing.assert_close(a.graft_proj["default"].A, b.graft_proj["default"].A, atol=projection_tolerance, rtol=0)


def three_calibrating_steps(tiny_llama, checkpointing):
    calibration = CalibratingSteps(graft(tiny_llama, projection="gradient"), steps=3)
    model = calibration.model
    if checkpointing is not None:  # how PEFT users train with gradient checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for seed in (3, 4, 5):
        with calibration.step(optimizer):
            model(**batch(seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_records_each_step_once(tiny_llama, reentrant):
    """Checkpointing re-runs forwards during backward; the statistics must still count every token once."""
    plain = three_calibrating_steps(tiny_llama, None)
    checkpointed = three_calibrating_steps(tiny_llama, reentrant)
    expected = dict(plain.named_parameters())
    for name, param in checkpointed.named_parameters():
        if param.requires_grad:
            assert_close(param.detach(), expected[name].detach(), name)
    for a, b in zip(layers(checkpointed), layers(plain), strict=True):
        torch.testing.assert_close(a.graft_proj["default"].A, b.graft_proj["default"].A, atol=1e-6, rtol=0)
