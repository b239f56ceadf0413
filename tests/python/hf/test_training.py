"""Training a converted model the way the recipe does: LM loss + mixsga.hf.aux_loss, under DDP and with
gradient checkpointing; the routers get gradients only through the aux loss."""

import pytest
import torch
import torch.distributed as dist
from tiny_models import tiny_model

import mixsga.hf


def router_grads(model):
    return [m.router.proj.weight.grad for m in mixsga.hf.mixsga_layers(model)]


def test_ddp_step_trains_the_routers(tmp_path):
    model = mixsga.hf.convert(tiny_model(dtype=torch.float32), group_sizes=(1, 2, 4), ratios=(0.3, 0.1, 0.6))
    model.train()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids = torch.randint(3, 64, (2, 16))
        for _ in range(2):  # two steps: DDP's bucket rebuild after the first must still see every parameter
            ddp.zero_grad()
            out = ddp(ids, labels=ids, use_cache=False)
            aux = mixsga.hf.aux_loss(ddp)
            (out.loss + aux).backward()
            assert all(g is not None and g.abs().sum() > 0 for g in router_grads(model))
            assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_gradient_checkpointing_keeps_the_aux_gradient():
    ids = torch.randint(3, 64, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2), ratios=(0.5, 0.5))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(ids, labels=ids, use_cache=False)
        (out.loss + mixsga.hf.aux_loss(model)).backward()
        grads.append(router_grads(model))
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain)


def test_a_lost_aux_graph_is_a_clear_error():
    # Layers that return the aux loss for the loop to add (aux_in_backward=False; the default sends it
    # through backward, which reentrant checkpointing keeps: tests/python/ecosystem): reentrant checkpointing
    # runs them under no_grad in forward, so the aux loss would silently not train the routers.
    model = mixsga.hf.convert(tiny_model(), group_sizes=(1, 2), ratios=(0.5, 0.5), aux_in_backward=False)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(3, 64, (2, 16))
    model(ids, labels=ids, use_cache=False)
    with pytest.raises(RuntimeError, match="aux_loss: the last forward kept no autograd graph"):
        mixsga.hf.aux_loss(model)
    with torch.no_grad():  # evaluation code reading it is fine
        assert mixsga.hf.aux_loss(model) > 0
