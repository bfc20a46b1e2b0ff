"""Entry point 2 of 3: one trial = K patient-grouped folds trained in lockstep, one epoch at a time.

The head stage trains each fold's head on cached features (`trainable.train.head_stage`); with
`ft_epochs` > 0 the fine-tuning stage follows (`trainable.train.finetune`). Both run through one
fold engine (`trainable.train.lockstep`), and every epoch of either is reported here the same way:
the cross-validated means (so ASHA stops trials on CV evidence, never on one fold), the Grad-CAM
lung / edge mass on the validation images, the objective, and a checkpoint
(`trainable.train.checkpoint`).
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import ray
import torch
from ray import tune

# a trial process imports only what the head stage needs (torch, numpy, ray): timm, torchvision,
# scikit-learn and scipy added ~3 s to the start of every trial actor
from trainable.shared import Prepared, with_defaults
from trainable.train.checkpoint import ft_state, read_checkpoint, restore_heads, save_checkpoint
from trainable.train.head_stage import FoldState, HeadStage, new_fold_state
from trainable.train.lockstep import run_lockstep

ScoreFn = Callable[[dict[str, float]], float]

# reported again every epoch as `running_<name>`: the value at the trial's best epoch so far (by the
# objective). ASHA, the searcher and trials.csv all rank on running_objective, so they agree.
RUNNING = ("objective", "focus", "lung_mass", "edge_mass", "balanced_accuracy", "macro_f1", "auc", "accuracy",
           "worst_group_accuracy", "within_group_auc", "loss")


def run_trial(config: dict, prepared: Prepared, score: ScoreFn) -> None:
    """Ray Tune function trainable: reads `config`, reports CV metrics and a checkpoint per epoch."""
    try:
        _run_trial(config, prepared, score)
    finally:  # also when ASHA stops the trial: a reused actor runs the next one on the same GPU
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # Ray issue #23971: GPU memory kept after ASHA stops a trial


def _run_trial(config: dict, prepared: Prepared, score: ScoreFn) -> None:
    config = with_defaults(config)
    torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))
    s = prepared.settings
    fs = prepared.features_for(config)
    states = [new_fold_state(config, fs.maps.shape[1], len(prepared.classes), s.seed + k)
              for k in range(len(prepared.folds))]
    cam = None
    if s.cam_layer != "final":  # builds a backbone: imported only by a trial that scores at another layer
        from trainable.cam.camlayer import layer_cam_for

        cam = layer_cam_for(config["backbone"], config["weights"], s.cam_layer, float(config["crop_margin"]),
                            s.input_size)
    start_epoch, history, saved = 0, [], None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        saved = read_checkpoint(checkpoint)
        start_epoch, history = restore_heads(states, saved)
    info = {"node_id": ray.get_runtime_context().get_node_id(),
            "restored_from_epoch": start_epoch,  # > 0: resumed from a checkpoint
            "weights_source": fs.weights_info.get("source", ""),
            "weights_sha256": fs.weights_info.get("sha256") or "",
            "cam_grid": "x".join(map(str, cam.grid if cam else fs.maps.shape[2:]))}
    run_lockstep(HeadStage(states, config, prepared, fs, cam), prepared, range(start_epoch, s.epochs),
                 _reporter(states, history, info, score, "head", epoch_offset=0))
    if int(config["ft_epochs"]) > 0:
        from trainable.train.finetune import FtStage  # builds backbones: imported only by a trial that fine-tunes

        torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))
        stage = FtStage(states, config, prepared, fs, resume=(saved or {}).get("ft"))
        if stage.folds[0].cam is not None:  # lung/edge mass come from settings.cam_layer's grid
            info["cam_grid"] = "x".join(map(str, stage.folds[0].cam.grid))
        else:
            info["cam_grid"] = "x".join(map(str, fs.maps.shape[2:]))
        run_lockstep(stage, prepared, range(stage.done, int(config["ft_epochs"])),
                     _reporter(states, history, info, score, "ft", epoch_offset=s.epochs,
                               ft=lambda done: ft_state(stage.folds, done)))


def _reporter(states: list[FoldState], history: list[dict], info: dict, score: ScoreFn, stage: str,
              epoch_offset: int, ft: Callable[[int], dict] | None = None) -> Callable[[int, dict, bool], None]:
    """What every epoch of either stage ends with: objective, epoch number, history, tune.report with
    a checkpoint. `ft(done)`: the fine-tuning state to checkpoint after `done` ft epochs."""
    # fault-tolerance drills (tests, docs/cluster.md): slow every epoch down so a worker can be killed mid-trial
    delay_s = float(os.environ.get("CXRTUNE_EPOCH_DELAY_S", "0") or 0) if stage == "head" else 0.0

    def report(epoch: int, metrics: dict, last: bool) -> None:
        if delay_s > 0:
            time.sleep(delay_s)
        metrics["objective"] = float(score(metrics))
        metrics["epoch"] = epoch_offset + epoch + 1
        metrics["stage"] = stage
        history.append({k: v for k, v in metrics.items() if not k.startswith("fold_") and k != "confusion"})
        best = max(history, key=lambda h: h["objective"])  # the first of equal bests, as trials.csv takes it
        metrics |= {f"running_{k}": best[k] for k in RUNNING if k in best}
        head_epochs = epoch + 1 if ft is None else epoch_offset
        with tempfile.TemporaryDirectory(prefix="cxrtune-ckpt-") as d:
            ckpt = save_checkpoint(d, states, head_epochs, history, None if ft is None else ft(epoch + 1))
            tune.report(metrics | info, checkpoint=ckpt)

    return report
