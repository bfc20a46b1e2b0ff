"""Adam for the head stage, stepped by torch's own fused Adam function, without `torch.optim.Optimizer`.

Why not `torch.optim.Adam`: its constructor imports `torch._dynamo` (`Optimizer.add_param_group`
is wrapped in `torch._disable_dynamo`, which imports it on first call): ≈ 1 s in every new trial
actor (`benchmarks/trial_startup.py`), for a head that is never compiled. `HeadAdam` keeps Adam's
state itself and steps with `torch.optim.adam.adam(..., fused=True)`, the function
`torch.optim.Adam.step` calls with the same arguments: the same updates bit for bit. Its
`state_dict()` has `torch.optim.Adam`'s layout, so a checkpoint written by either loads into the
other (tests/test_head_adam.py checks both). The fine-tuning stage still uses `torch.optim.Adam`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adam import adam


class HeadAdam:
    """Adam (L2 weight decay, no amsgrad) over one group of float CPU/CUDA parameters; fused kernel."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("HeadAdam got an empty parameter list")
        # the group in torch.optim.Adam's vocabulary: state_dict() carries it as Adam does
        self.group: dict[str, Any] = dict(lr=float(lr), betas=tuple(betas), eps=float(eps),
                                          weight_decay=float(weight_decay), amsgrad=False, maximize=False,
                                          foreach=None, capturable=False, differentiable=False, fused=True,
                                          decoupled_weight_decay=False)
        self.state: dict[int, dict[str, torch.Tensor]] = {}  # by parameter index, as in a state_dict

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            st = self.state.get(i)
            if st is None:  # what Adam._init_group makes for a fused group
                st = self.state[i] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        if not params:
            return
        g = self.group
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False,
             beta1=g["betas"][0], beta2=g["betas"][1], lr=g["lr"], weight_decay=g["weight_decay"],
             eps=g["eps"], maximize=False)

    def state_dict(self) -> dict[str, Any]:
        """`torch.optim.Adam.state_dict()`'s layout: {"state": {index: tensors}, "param_groups": [...]}."""
        return {"state": {i: dict(st) for i, st in self.state.items()},
                "param_groups": [{**self.group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A state dict of this class or of `torch.optim.Adam` over the same parameters."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"optimizer state for {[len(g['params']) for g in groups]} parameter(s) in "
                             f"{len(groups)} group(s); this head has {len(self.params)} in one")
        index = {saved: i for i, saved in enumerate(groups[0]["params"])}
        self.group.update({k: groups[0][k] for k in ("lr", "betas", "eps", "weight_decay") if k in groups[0]})
        self.group["betas"] = tuple(self.group["betas"])
        self.state = {}
        for saved, st in state_dict["state"].items():
            p = self.params[index[saved]]
            self.state[index[saved]] = {
                "step": torch.as_tensor(st["step"], dtype=torch.float32).to(p.device).clone(),
                "exp_avg": st["exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
                "exp_avg_sq": st["exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone()}
