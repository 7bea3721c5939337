"""DPTrainer under ``torchrun --nproc-per-node 2`` (gloo, CPU) is the core's distributed DP-SGD: one Poisson
sample over all ranks, the clipped sum of one process with the whole batch, noise drawn once, the same ε; and
a checkpoint resumes it exactly.

The ranks run the README's example (``examples/torchrun_gpt2.py``); the reference is the same example in this
process with the whole expected batch (``per_device_train_batch_size`` times 2).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

import dpkit
import dpkit_transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from torchrun_gpt2 import train  # noqa: E402

WORLD, LR, C, EXPECTED_BATCH = 2, 0.1, 0.5, 8  # the example's learning rate, clipping bound and 2 · 2 · WORLD


def torchrun(folder: str, timeout: float = 300) -> list[dict]:
    """The worker on WORLD ranks under torchrun, killed (with its ranks) past ``timeout`` seconds."""
    source = [os.path.dirname(os.path.dirname(m.__file__)) for m in (dpkit, dpkit_transformers)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*source, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               os.path.join(HERE, "_torchrun_worker.py"), folder]
    launch = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        output, _ = launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        output, _ = launch.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{output[-4000:]}")
    assert launch.returncode == 0, output[-4000:]
    return [torch.load(os.path.join(folder, f"rank-{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_train_as_one_process_with_the_whole_batch(tmp_path):
    ranks = torchrun(str(tmp_path / "ranks"))
    for rank in ranks[1:]:  # the replicas agree bit for bit: every rank received the same noised sum
        for key, result in rank.items():
            assert result["steps"] == ranks[0][key]["steps"] and result["world_size"] == WORLD
            for name, weight in result["weights"].items():
                assert torch.equal(weight, ranks[0][key]["weights"][name]), (key, name)
    assert [ranks[0][key]["steps"] for key in (0.0, 1.0, "straight", "resumed")] == [3, 1, 2, 2]

    # A checkpoint (its privacy state in a private state_dir, gathered from every rank) resumes the same run.
    straight, resumed = ranks[0]["straight"], ranks[0]["resumed"]
    assert resumed["epsilon"] == straight["epsilon"]
    for name, weight in resumed["weights"].items():
        assert torch.equal(weight, straight["weights"][name]), name

    # σ = 0: the same global Poisson batches and the same clipped step as one process with the whole batch.
    whole = train(str(tmp_path / "whole"), noise_multiplier=0.0, max_steps=3, batch_size=2 * WORLD)
    for name, weight in whole.model.named_parameters():
        torch.testing.assert_close(ranks[0][0.0]["weights"][name], weight.detach(), rtol=1e-5, atol=1e-6, msg=name)

    # σ = 1: the same ε; the noise on the released step has std σC once (not √W times, not 1/√W), measured
    # against the noise-free step from the same weights and the same batch.
    noisy = train(str(tmp_path / "noisy"), noise_multiplier=1.0, max_steps=1, batch_size=2 * WORLD)
    assert ranks[0][1.0]["epsilon"] == noisy.private.epsilon(1e-5)
    clean = train(str(tmp_path / "clean"), noise_multiplier=0.0, max_steps=1, batch_size=2 * WORLD)
    noise = torch.cat([(ranks[0][1.0]["weights"][n] - p.detach()).flatten() for n, p in clean.model.named_parameters()])
    noise = noise * EXPECTED_BATCH / LR  # the step is -lr · (clipped sum + noise) / expected batch size
    assert noise.numel() > 5000 and abs(noise.mean().item()) < 0.05 * C
    assert 0.93 * C < noise.std().item() < 1.07 * C, noise.std().item()
