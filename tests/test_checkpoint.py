"""A run killed with SIGKILL and resumed from its last checkpoint ends where an uninterrupted run ends.

Same parameters bit for bit, same privacy ledger, same ε: the checkpoint holds the
model, the optimizer, the Poisson sampler's generator, the noise generator (or, for
BandMF and BLT, its history) and the adaptive clipper's bound (``private.state_dict()``).
Every noise mechanism, killed at three points of a step: after the backward pass,
after the release, and after the checkpoint was written (docs/faults.md).
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TRAIN = r'''
import importlib, os, signal, sys
import torch
from torch import nn
from torch.utils.data import TensorDataset
import dpkit
from dpkit import registry
from dpkit.data import DPDataLoader

torch.set_num_threads(1)
checkpoint, steps, kill_after, result = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
mechanism, kill_at = sys.argv[5], sys.argv[6]
if "dpkit.clipping.adaptive" not in registry.BUILTIN_PLUGINS:
    registry.register_plugin(importlib.import_module("dpkit.clipping.adaptive"), name="dpkit.clipping.adaptive")

torch.manual_seed(0)
x = torch.randn(64, 5)
y = (x.sum(1) > 0).long()
model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
data, gen = TensorDataset(x, y), torch.Generator().manual_seed(1)
if mechanism == "gaussian":
    run = dict(data_loader=DPDataLoader(data, sample_rate=0.125, generator=gen), clipping="adaptive",
               clipping_kwargs={"count_noise_multiplier": 2.0, "expected_batch_size": 8.0})
elif mechanism in ("bandmf", "blt"):
    run = dict(data_loader=dpkit.data.CyclicPoissonLoader(data, 0.5, 4, generator=gen), noise=mechanism,
               noise_kwargs={"bands": 2} if mechanism == "bandmf" else {"buffers": 2, "steps": 12})
else:
    run = dict(data_loader=dpkit.data.ShuffledBatchLoader(data, 8, generator=gen), noise=mechanism)
private = dpkit.make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), noise_multiplier=1.0,
    max_grad_norm=1.0, noise_seed=3, criterion=nn.CrossEntropyLoss(), **run)
model, optimizer, loader, criterion = private
if os.path.exists(checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(state["model"])
    private.load_state_dict(state["private"])
while private.steps < steps:
    for xb, yb in loader:
        optimizer.zero_grad()
        criterion(model(xb), yb).backward()
        if kill_at == "backward" and private.steps + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        optimizer.step()
        if kill_at == "release" and private.steps == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        dpkit.engine.save({"model": model.state_dict(), "private": private.state_dict()}, checkpoint)
        if kill_at == "saved" and private.steps == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if private.steps == steps:
            break
torch.save({"parameters": [p.detach() for p in model.parameters()], "ledger": private.ledger.state_dict(),
            "epsilon": private.epsilon(1e-5), "bound": private.clipper.max_grad_norm}, result)
'''


def _run(script: Path, checkpoint: Path, steps: int, kill_after: int, result: Path, mechanism: str, kill_at: str
         ) -> int:
    argv = [str(script), str(checkpoint), str(steps), str(kill_after), str(result), mechanism, kill_at]
    return subprocess.run([sys.executable, *argv], check=False, timeout=300).returncode


@pytest.mark.parametrize("mechanism, kill_at", [("gaussian", "saved"), ("gaussian", "backward"),
                                                ("bandmf", "release"), ("blt", "backward"), ("tree", "release"),
                                                ("tree-honaker", "saved")])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, mechanism, kill_at):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    steps = 12
    assert _run(script, tmp_path / "straight.pt", steps, -1, tmp_path / "straight_result.pt", mechanism, "") == 0

    checkpoint, result = tmp_path / "resumed.pt", tmp_path / "resumed_result.pt"
    assert _run(script, checkpoint, steps, 5, result, mechanism, kill_at) == -signal.SIGKILL
    assert not result.exists()
    # Killed after the backward pass or the release, the last checkpoint is the step before's: the resumed run
    # draws that batch again (the released step was never saved, so it is not counted twice either).
    assert torch.load(checkpoint, weights_only=True)["private"]["steps"] == (5 if kill_at == "saved" else 4)
    assert _run(script, checkpoint, steps, -1, result, mechanism, "") == 0

    straight, resumed = (torch.load(p, weights_only=True) for p in (tmp_path / "straight_result.pt", result))
    for a, b in zip(straight["parameters"], resumed["parameters"], strict=True):
        assert torch.equal(a, b)
    assert resumed["ledger"] == straight["ledger"]
    assert sum(count for _, count in resumed["ledger"]["entries"]) == steps
    assert resumed["epsilon"] == straight["epsilon"]
    assert resumed["bound"] == straight["bound"]
    assert (resumed["bound"] != 1.0) == (mechanism == "gaussian")  # adaptive clipping moved the bound
