"""A converted model under an unmodified transformers ``Trainer``: the routers train with the gradient of the
paper's loss on the Trainer's global batch (gradient accumulation included), the aux loss is logged, a
checkpoint resumes exactly, and ``evaluate`` agrees with ``mixsga.train.perplexity``."""

import copy
import math

import pytest
import torch
from test_aux_gradient import converted, reference_of
from transformers import Trainer, TrainerCallback, TrainingArguments

import mixsga.hf
import mixsga.train

SAMPLES = torch.randint(3, 64, (8, 12), generator=torch.Generator().manual_seed(11))


def dataset(samples=SAMPLES):
    return [{"input_ids": s, "labels": s} for s in samples]


def arguments(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                  learning_rate=1e-2, max_steps=2, max_grad_norm=0.0, use_cpu=True, report_to=[], logging_steps=1,
                  save_strategy="no", seed=3, data_seed=3, disable_tqdm=True, lr_scheduler_type="constant")
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class FirstStepGradients(TrainerCallback):
    """Keeps every parameter's gradient just before the first optimizer step, and the batches it saw."""

    def __init__(self, model):
        self.grads, self.batches = None, []
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if self.grads is None and module.training:
            self.batches.append(kwargs["input_ids"].clone())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def routers(model):
    return [m.router.proj.weight.detach().clone() for m in mixsga.hf.mixsga_layers(model)]


def test_an_unmodified_trainer_trains_the_routers_and_logs_the_aux_loss(tmp_path):
    model = converted()
    before = routers(model)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=dataset(),
                      callbacks=[mixsga.hf.AuxLossCallback()])
    trainer.train()
    assert all(not torch.equal(a, b) for a, b in zip(before, routers(model)))
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(entry["aux_loss"] > 0 for entry in logged)


@pytest.mark.parametrize("batch,accumulation", [(4, 1), (2, 2)])
def test_the_router_gradient_is_the_papers_loss_on_the_global_batch(tmp_path, batch, accumulation):
    model = converted()
    initial = copy.deepcopy(model)
    spy = FirstStepGradients(model)
    trainer = Trainer(model=model, args=arguments(tmp_path, per_device_train_batch_size=batch,
                                                  gradient_accumulation_steps=accumulation, max_steps=1),
                      train_dataset=dataset(), callbacks=[spy])
    trainer.train()
    global_batch = torch.cat(spy.batches)
    assert global_batch.shape == (4, 12)
    # Explicit: LM loss (mean over the global batch's label tokens) + mean over layers of aux_alpha * L_aux.
    ref = reference_of(initial).train()
    out = ref(global_batch, labels=global_batch)
    (out.loss + mixsga.hf.aux_loss(ref)).backward()
    for name, param in ref.named_parameters():
        torch.testing.assert_close(spy.grads[name], param.grad, rtol=1e-6, atol=1e-9, msg=name)
    assert any("router" in n and g.abs().sum() > 0 for n, g in spy.grads.items())


def test_a_resumed_checkpoint_gives_the_uninterrupted_result(tmp_path):
    whole = converted()
    Trainer(model=whole, args=arguments(tmp_path / "a", max_steps=4), train_dataset=dataset()).train()
    first = converted()
    Trainer(model=first, args=arguments(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2),
            train_dataset=dataset()).train()
    resumed = converted()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    assert checkpoint.is_dir()
    Trainer(model=resumed, args=arguments(tmp_path / "b", max_steps=4), train_dataset=dataset()).train(
        resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_evaluate_agrees_with_mixsga_train_perplexity(tmp_path):
    model = converted()
    trainer = Trainer(model=model, args=arguments(tmp_path, per_device_eval_batch_size=4), eval_dataset=dataset())
    loss = trainer.evaluate()["eval_loss"]
    ppl = mixsga.train.perplexity(model, SAMPLES, batch_size=4)
    assert math.exp(loss) == pytest.approx(ppl, rel=1e-6)
