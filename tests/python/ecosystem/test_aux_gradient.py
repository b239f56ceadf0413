"""The aux loss reaches the routers through backward, whatever loss a loop backpropagates, with the scale of
the paper's loss (LM + alpha / N_layers * sum_l L_aux) on the loop's global batch; and the training-mode
guards of a converted model (no cache, packed batches refused, clear errors)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

import mixsga.hf

GROUPS, RATIOS = (1, 2, 4), (0.3, 0.1, 0.6)


def converted(seed: int = 0, **options):
    model = mixsga.hf.convert(tiny_model(seed=seed), group_sizes=GROUPS, ratios=RATIOS, **options)
    for layer in mixsga.hf.mixsga_layers(model):  # routers away from their init, so every expert gets tokens
        with torch.no_grad():
            layer.router.proj.weight.normal_(0, 0.5)
    return model.train()


def reference_of(model):
    """The same weights with layers that return the aux loss with its graph: the explicit paper's loss."""
    ref = copy.deepcopy(model)
    for layer in mixsga.hf.mixsga_layers(ref):
        layer.aux_in_backward = False
    return ref


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def own_loss(logits, ids):
    """A loss computed by the loop itself (float64, unlike transformers' float32 one)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def papers_loss_grads(model, ids, mask=None, lm_loss=None):
    """Gradients and value of LM + mean over layers of aux_alpha * L_aux, the LM loss transformers' (from
    labels) or ``lm_loss(logits, ids)``."""
    ref = reference_of(model)
    ref.zero_grad()
    out = ref(ids, attention_mask=mask, labels=None if lm_loss else ids)
    loss = (lm_loss(out.logits, ids) if lm_loss else out.loss) + mixsga.hf.aux_loss(ref)
    loss.backward()
    return grads(ref), float(loss.detach())


def assert_grads_equal(got, want, scale=1.0):
    assert set(got) == set(want)
    assert any("router" in n for n in got), "the routers got no gradient"
    for name in want:
        torch.testing.assert_close(got[name], want[name] * scale, rtol=1e-10, atol=1e-12, msg=name)


IDS = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(5))


def test_outputs_loss_holds_the_aux_loss_and_its_gradient_equals_the_papers_loss():
    model = converted()
    want, want_value = papers_loss_grads(model, IDS)
    out = model(IDS, labels=IDS)
    out.loss.backward()
    assert_grads_equal(grads(model), want)
    # transformers computes the LM loss in float32 (it upcasts the logits), so the sum is float32.
    assert float(out.loss.detach()) == pytest.approx(want_value, rel=1e-6)
    assert float(out.aux_loss) > 0
    # The value helper only reads: adding it to the loss cannot count the aux gradient twice.
    model.zero_grad()
    out = model(IDS, labels=IDS)
    (out.loss + mixsga.hf.aux_loss(model)).backward()
    assert_grads_equal(grads(model), want)


def test_a_loss_the_loop_computes_itself_trains_the_routers_once():
    model = converted()
    want, _ = papers_loss_grads(model, IDS, lm_loss=own_loss)
    own_loss(model(IDS).logits, IDS).backward()  # no labels: a loop with its own loss (TRL, distillation, ...)
    assert_grads_equal(grads(model), want)
    # Such a loop tells the model its normalisation: here it halves the loss.
    model.zero_grad()
    mixsga.hf.set_aux_loss_scale(model, 0.5)
    (own_loss(model(IDS).logits, IDS) / 2).backward()
    assert_grads_equal(grads(model), want, scale=0.5)


@pytest.mark.parametrize("style", ["num_items_in_batch", "divide_by_steps"])
def test_gradient_accumulation_gives_the_global_batchs_gradient(style):
    model = converted()
    want, _ = papers_loss_grads(model, IDS)
    halves = IDS.chunk(2)
    total = sum(int((h[:, 1:] != -100).sum()) for h in halves)
    for h in halves:
        if style == "num_items_in_batch":  # transformers' Trainer: each loss is sum / all items of the step
            model(h, labels=h, num_items_in_batch=torch.tensor(total)).loss.backward()
        else:  # a loop that averages micro-batch means
            (model(h, labels=h).loss / len(halves)).backward()
    assert_grads_equal(grads(model), want)


def test_eval_mode_loss_is_the_plain_cross_entropy():
    model = converted().eval()
    with torch.no_grad():
        out = model(IDS, labels=IDS)
    torch.testing.assert_close(out.loss, own_loss(out.logits, IDS).float())
    assert float(out.aux_loss) > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_aux_gradient(reentrant):
    model = converted()
    want, _ = papers_loss_grads(model, IDS)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    # Halved, as under 2 accumulation steps: the layers recomputed in backward must see the 1/2 too.
    (model(IDS, labels=IDS).loss / 2).backward()
    assert_grads_equal(grads(model), want, scale=0.5)


def test_a_training_forward_never_builds_a_cache():
    model = converted()
    assert model.config.use_cache
    out = model(IDS)
    assert out.past_key_values is None
    cache = mixsga.hf.MixSGACache(num_layers=2)
    with torch.no_grad():
        model.eval()(IDS[:, :6], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="past_key_values: a training forward .* non-empty KV cache"):
        model.train()(IDS[:, 6:7], past_key_values=cache, use_cache=True)


def test_packed_batches_are_refused_never_mixed():
    model = converted()
    positions = torch.cat([torch.arange(5), torch.arange(7)]).expand(4, -1)  # two sequences per row
    with pytest.raises(ValueError, match="position_ids: row 0 jumps from 4 to 0 at token 5: packed sequences"):
        model(IDS, position_ids=positions, labels=IDS)
    with pytest.raises(ValueError, match="cu_seq_lens_q: packed"):
        model(IDS, cu_seq_lens_q=torch.tensor([0, 5, 12]), labels=IDS)
    # Left padding (positions repeat over the padding) is not packing.
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    model(IDS, attention_mask=mask, position_ids=pos, labels=IDS)


def test_frozen_routers_warn_once():
    model = converted()
    for layer in mixsga.hf.mixsga_layers(model):
        layer.router.requires_grad_(False)
    with pytest.warns(UserWarning, match="routers are frozen while aux_alpha > 0"):
        model(IDS, labels=IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(IDS, labels=IDS)


def test_bad_options_name_the_argument():
    with pytest.raises(TypeError, match="convert: unexpected option 'key_scales'"):
        mixsga.hf.convert(tiny_model(), key_scales="learned")
    with pytest.raises(TypeError, match="blocks: expected a \\[N, T\\] integer tensor .* got list"):
        mixsga.hf.prepare(converted(), ["text"])
    with pytest.raises(ValueError, match="scale: must be a finite number >= 0, got -1"):
        mixsga.hf.set_aux_loss_scale(converted(), -1)
    with pytest.raises(TypeError, match="set_aux_loss_scale needs a model converted"):
        mixsga.hf.set_aux_loss_scale(tiny_model(), 1.0)


def test_causal_routing_evaluates_what_decoding_does():
    model = converted().eval()
    ids = IDS[:1]
    with torch.no_grad():
        choice = model(ids).logits
        with mixsga.hf.causal_routing(model):
            causal = model(ids).logits
            # Token by token through the compact cache: decode steps route by argmax; so does the first
            # token's prefill here.
            cache = mixsga.hf.MixSGACache(num_layers=2)
            steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
                     for t in range(ids.shape[1])]
    torch.testing.assert_close(causal, torch.cat(steps, 1), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(choice, causal, atol=1e-6)
    assert all(m.prefill_routing == "expert_choice" for m in mixsga.hf.mixsga_layers(model))  # restored
    with pytest.raises(TypeError, match="causal_routing needs a model converted"):
        with mixsga.hf.causal_routing(tiny_model()):
            pass
