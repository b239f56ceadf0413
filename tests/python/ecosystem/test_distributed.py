"""Scale-out on existing engines, 2 CPU processes on gloo (torchrun): FSDP2 (``mixsga.train.shard_fsdp2``, one
``fully_shard`` per decoder layer), DDP through accelerate, and the Trainer (gradient accumulation 2 and
``average_tokens_across_devices``). Each gives the loss and every gradient, routers included, of one process
on the global batch: the paper's loss, LM + mean over layers of aux_alpha * L_aux."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from distributed_worker import GLOBAL_BATCH
from test_aux_gradient import converted, reference_of

import mixsga.hf

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def run_two_ranks(mode, tmp_path):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", WORKER, mode, str(tmp_path)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(tmp_path / f"{mode}.pt", weights_only=False)


@pytest.mark.parametrize("mode", ["fsdp2", "accelerate", "trainer"])
def test_two_processes_give_the_one_process_gradient(tmp_path, mode):
    got = run_two_ranks(mode, tmp_path)
    ref = reference_of(converted())
    out = ref(GLOBAL_BATCH, labels=GLOBAL_BATCH)
    (out.loss + mixsga.hf.aux_loss(ref)).backward()
    assert sum("router" in n for n in got["grads"]) == 4
    for name, param in ref.named_parameters():
        torch.testing.assert_close(got["grads"][name], param.grad, rtol=1e-6, atol=1e-9, msg=name)
