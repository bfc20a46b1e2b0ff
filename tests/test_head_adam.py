"""HeadAdam (trainable.models.head_adam) against torch.optim.Adam(fused=True): the same updates bit for
bit, checkpoints that load either way, and a head stage that never imports torch._dynamo."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainable.models.head import Head
from trainable.models.head_adam import HeadAdam

ROOT = Path(__file__).resolve().parents[1]


def _pair(weight_decay: float) -> tuple[Head, Head]:
    torch.manual_seed(0)
    a = Head(64, 16, 3, 0.0)
    b = Head(64, 16, 3, 0.0)
    b.load_state_dict(a.state_dict())
    return a, b


def _steps(head: Head, opt, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 64, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()


def _saved(state: dict) -> dict:
    """Through torch.save/torch.load, as a checkpoint goes (a live state_dict shares its tensors)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _same(a: Head, b: Head) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_the_same_updates_as_torch_fused_adam(weight_decay):
    a, b = _pair(weight_decay)
    ours = HeadAdam(a.parameters(), lr=3e-3, weight_decay=weight_decay)
    theirs = torch.optim.Adam(b.parameters(), lr=3e-3, weight_decay=weight_decay, fused=True)
    _steps(a, ours, 25, seed=1)
    _steps(b, theirs, 25, seed=1)
    _same(a, b)
    assert not torch.equal(a.net[0].weight, _pair(weight_decay)[0].net[0].weight)  # it did train


def test_checkpoints_load_either_way():
    a, b = _pair(1e-3)
    ours = HeadAdam(a.parameters(), lr=1e-2, weight_decay=1e-3)
    _steps(a, ours, 5, seed=2)
    # ours -> torch.optim.Adam: both continue identically
    b.load_state_dict(a.state_dict())
    theirs = torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=1e-3, fused=True)
    theirs.load_state_dict(_saved(ours.state_dict()))
    _steps(a, ours, 5, seed=3)
    _steps(b, theirs, 5, seed=3)
    _same(a, b)
    # torch.optim.Adam -> ours (a checkpoint written before HeadAdam existed)
    c, _ = _pair(0.0)
    c.load_state_dict(b.state_dict())
    resumed = HeadAdam(c.parameters(), lr=1e-2, weight_decay=1e-3)
    resumed.load_state_dict(_saved(theirs.state_dict()))
    _steps(b, theirs, 5, seed=4)
    _steps(c, resumed, 5, seed=4)
    _same(b, c)
    assert float(resumed.state[0]["step"]) == 15.0


def test_a_state_for_other_parameters_is_refused():
    a, _ = _pair(0.0)
    other = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="this head has 4"):
        HeadAdam(a.parameters(), lr=1e-3).load_state_dict(other.state_dict())


def test_the_head_stage_does_not_import_torch_dynamo():
    """What a trial actor runs in the head stage, in a fresh interpreter: a fold state, training
    steps and its checkpoint state; torch._dynamo (0.96 s to import) must not come in."""
    code = (
        "import sys, torch\n"
        "from trainable.shared import with_defaults\n"
        "from trainable.train.head_stage import new_fold_state\n"
        "st = new_fold_state(with_defaults({'hidden': 8}), 32, 2, 0)\n"
        "x, y = torch.randn(16, 32), torch.randint(0, 2, (16,))\n"
        "from trainable.models.head import train_one_epoch\n"
        "train_one_epoch(st.head, st.optimizer, x, y, 4, st.generator, None)\n"
        "st.optimizer.load_state_dict(st.optimizer.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
