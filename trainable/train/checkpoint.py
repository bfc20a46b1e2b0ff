"""The one owner of a trial's checkpoint format (`state.pt` in a Tune checkpoint directory).

    {"epoch": head epochs done, "history": [per-epoch metrics],
     "heads": [head state_dict per fold], "optimizers": [...], "generators": [...], "torch_rng": dropout's RNG,
     "ft": {"done": ft epochs done, "folds": [per fold: model, optimizer, generator, early-stopping
            counters, stopped, current and best validation result]}   # only once fine-tuning ran}

Head-stage checkpoints hold the K heads (small: the frozen backbone is not in them); from the
fine-tuning stage on they also hold each fold's whole model. Readers: `run_trial` (resume),
`search.outputs.evidence` (montages), nothing else opens the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from ray import tune
from torch import nn

if TYPE_CHECKING:
    from trainable.train.head_stage import FoldState


class FtFold(Protocol):
    """What the fine-tuning stage keeps per fold (`trainable.train.finetune.FtFold`), as saved here."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    early: Any          # EarlyStopping: its counters and best state are saved as vars()
    stopped: bool
    current: dict
    best: dict

STATE_FILE = "state.pt"


def save_checkpoint(d: str, states: list[FoldState], epoch: int, history: list[dict],
                    ft: dict | None = None) -> tune.Checkpoint:
    """Write the trial's state into directory `d` and return it as a Tune checkpoint.

    `ft`: the fine-tuning stage's state (`ft_state`), absent during the head stage."""
    state = {"epoch": epoch, "history": history,
             "heads": [st.head.state_dict() for st in states],
             "optimizers": [st.optimizer.state_dict() for st in states],
             "generators": [st.generator.get_state() for st in states],
             # dropout draws from torch's global generator: a resumed trial continues its stream
             "torch_rng": torch.get_rng_state()}
    if ft is not None:
        state["ft"] = ft
    torch.save(state, os.path.join(d, STATE_FILE))
    return tune.Checkpoint.from_directory(d)


def read_checkpoint(checkpoint: tune.Checkpoint | str | Path) -> dict:
    """The state dict of a Tune checkpoint (or of a checkpoint directory on disk)."""
    if isinstance(checkpoint, (str, Path)):
        return torch.load(Path(checkpoint) / STATE_FILE, weights_only=False, map_location="cpu")
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), weights_only=False, map_location="cpu")


def restore_heads(states: list[FoldState], state: dict) -> tuple[int, list[dict]]:
    """Load the head stage's per-fold state; returns (head epochs done, history)."""
    for st, h, o, g in zip(states, state["heads"], state["optimizers"], state["generators"]):
        st.head.load_state_dict(h)
        st.optimizer.load_state_dict(o)
        st.generator.set_state(g)
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    return state["epoch"], state["history"]


def fold_models(state: dict) -> list[dict]:
    """Per fold, what explains its validation images: the fine-tuned model's state dict (keys
    `backbone.*`, `head.*`) once fine-tuning ran, else the head's."""
    if state.get("ft"):
        return [f["model"] for f in state["ft"]["folds"]]
    return state["heads"]


def ft_state(folds: list[FtFold], done: int) -> dict:
    """The fine-tuning stage's state after `done` ft epochs (the "ft" entry)."""
    return {"done": done, "folds": [
        {"model": ff.model.state_dict(), "optimizer": ff.optimizer.state_dict(),
         "generator": ff.generator.get_state(), "early": vars(ff.early), "stopped": ff.stopped,
         "current": ff.current, "best": ff.best} for ff in folds]}


def restore_ft(folds: list[FtFold], ft: dict) -> int:
    """Load `ft_state` into freshly built folds; returns the ft epochs done."""
    for ff, st in zip(folds, ft["folds"]):
        ff.model.load_state_dict(st["model"])
        ff.optimizer.load_state_dict(st["optimizer"])
        ff.generator.set_state(st["generator"])
        vars(ff.early).update(st["early"])
        ff.stopped, ff.current, ff.best = st["stopped"], st["current"], st["best"]
    return int(ft["done"])
