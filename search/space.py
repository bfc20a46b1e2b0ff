"""The space file: a YAML sweep description, validated before anything runs.

Unknown keys, bad ranges and unknown backbones are errors that name the file, the field, the
value received and the rule (in the spirit of Optuna's argument checks). Example::

    name: default
    task: covid_vs_rest
    data: {synthetic: {n_patients: 48, shortcut: 0.9}}
    folds: 3
    epochs: 6
    num_samples: 10
    objective: {mode: weighted, metric: balanced_accuracy, w: 0.5}
    space:
      backbone: {choice: [efficientnet_lite0, efficientnet_lite1]}
      lr: {loguniform: [3.0e-4, 3.0e-2]}
      crop_margin: {choice: [0.0, 0.08]}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainable.data.dataset import TASKS
from trainable.data.augment import AUGMENT_POLICIES
from trainable.errors import CxrtuneError
from trainable.cam.loss import CAM_LOSS_REGIONS
from trainable.models.featureset import POOLS
from trainable.models.registry import UnknownBackboneError, get_spec
from trainable.shared import TRIAL_DEFAULTS, Settings
from trainable.train.balance import BALANCE_MODES
from trainable.train.metrics import OBJECTIVE_METRICS

SPACES_DIR = Path(__file__).resolve().parent.parent / "spaces"
METRICS = OBJECTIVE_METRICS


class SpaceError(CxrtuneError, ValueError):
    """The space file breaks a rule."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Choice(_Strict):
    choice: list[Any] = Field(min_length=1)


class Uniform(_Strict):
    uniform: tuple[float, float]

    @model_validator(mode="after")
    def _ordered(self) -> "Uniform":
        lo, hi = self.uniform
        if not lo < hi:
            raise ValueError(f"uniform needs low < high (got [{lo}, {hi}])")
        return self


class LogUniform(_Strict):
    loguniform: tuple[float, float]

    @model_validator(mode="after")
    def _positive_ordered(self) -> "LogUniform":
        lo, hi = self.loguniform
        if not 0 < lo < hi:
            raise ValueError(f"loguniform needs 0 < low < high (got [{lo}, {hi}])")
        return self


class RandInt(_Strict):
    randint: tuple[int, int]

    @model_validator(mode="after")
    def _ordered(self) -> "RandInt":
        lo, hi = self.randint
        if not lo < hi:
            raise ValueError(f"randint needs low < high, high exclusive (got [{lo}, {hi}])")
        return self


Param = Union[Choice, Uniform, LogUniform, RandInt, bool, int, float, str]


class Synthetic(_Strict):
    n_patients: int = Field(48, ge=6)
    size: int = Field(256, ge=32, le=1024)
    shortcut: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 0
    lesion_strength: float = Field(1.0, ge=0.0, le=3.0)
    confound: Literal["none", "anatomy"] = "none"   # anatomy: adult/child body correlated with the class
    confound_rate: float = Field(0.85, ge=0.5, le=1.0)


class DataSpec(_Strict):
    synthetic: Synthetic | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.synthetic is None) == (self.path is None):
            raise ValueError("data needs exactly one of `synthetic` or `path`")
        return self


class Objective(_Strict):
    """`weighted` | `constraint` | `pareto` (search.objective). In `pareto` mode the searcher maximises
    [metric, focus] at each trial's best epoch so far and ASHA stops on the weighted score (w)."""

    mode: Literal["weighted", "constraint", "pareto"] = "weighted"
    metric: Literal[METRICS] = "balanced_accuracy"  # type: ignore[valid-type]
    w: float = Field(0.5, ge=0.0)
    lung_floor: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _floor_only_for_constraint(self) -> "Objective":
        # a floor set in another mode would be silently ignored: say so instead
        if self.lung_floor > 0 and self.mode != "constraint":
            raise ValueError(f"lung_floor ({self.lung_floor}) applies to mode 'constraint' only "
                             f"(mode is {self.mode!r}; pareto keeps focus as its second objective)")
        return self

    def searcher_objectives(self) -> tuple[list[str], list[str]] | None:
        """(metrics, modes) for a multi-objective searcher in `pareto` mode; None otherwise."""
        return ([f"running_{self.metric}", "running_focus"], ["max", "max"]) if self.mode == "pareto" else None


class Asha(_Strict):
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)


class Resources(_Strict):
    """Per trial (and per feature task). Fractional GPUs share one device: 0.25 packs four trials."""

    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _ray_quantities(self) -> "Resources":
        # Ray schedules a fraction of one GPU, or whole GPUs, never 1.5
        g = self.gpus_per_trial
        if g > 1 and g != int(g):
            raise ValueError(f"gpus_per_trial must be a fraction below 1 or a whole number (got {g})")
        return self


class SweepSpec(_Strict):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9._-]+$")
    task: str = "covid_vs_rest"
    data: DataSpec = DataSpec(synthetic=Synthetic())
    folds: int = Field(3, ge=2, le=20)
    epochs: int = Field(6, ge=1)
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(0, ge=0)  # 0 = as many as resources allow
    seed: int = 0
    base_size: int = Field(256, ge=32, le=2048)
    input_size: int = Field(224, ge=32, le=1024)
    views: int = Field(4, ge=1, le=64)
    edge_band: float = Field(0.08, ge=0.0, lt=0.5)
    atlas_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    cam_target: str = "true"  # "true" | "predicted" | a class name (checked against the data's classes)
    group_column: str = "source"  # manifest column for group-aware metrics
    min_cell: int = Field(5, ge=1)
    # Grad-CAM layer for lung/edge mass: "final" (the backbone's last maps, fast path) or a stage
    # output such as body.blocks.4 (finer grid, full-model path every epoch; trainable.cam.camlayer)
    cam_layer: str = "final"
    select_within: float = Field(0.02, ge=0.0, le=1.0)  # `selected/`: most lung-focused within this of the best metric
    # held-out test split: this fraction of patients (stratified, seeded) never reaches the search;
    # 0 = none, the default so that sweeps saved before the field existed resume unchanged
    holdout: float = Field(0.0, ge=0.0, lt=1.0)
    max_failures: int = Field(1, ge=0)
    # lung-mask source: auto (the data's where present, else the atlas) | data | atlas | pspnet
    # (torchxrayvision's PSPNet, once per sweep, disk-cached; trainable.cam.lung_segment)
    lung_masks: Literal["auto", "data", "atlas", "pspnet"] = "auto"
    objective: Objective = Objective()
    asha: Asha = Asha()
    resources: Resources = Resources()
    space: dict[str, Param]

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)} (got {v!r})")
        return v

    @field_validator("space")
    @classmethod
    def _known_params(cls, space: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(space) - set(TRIAL_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; known: {sorted(TRIAL_DEFAULTS)}")
        for key, param in space.items():
            for value in _values(param) or []:
                _check_value(key, value)
            _check_range(key, param)
        return space

    @model_validator(mode="after")
    def _grace_within_epochs(self) -> "SweepSpec":
        if self.asha.grace_period > self.epochs:
            raise ValueError(f"asha.grace_period ({self.asha.grace_period}) must be <= epochs ({self.epochs})")
        return self

    @model_validator(mode="after")
    def _oversample_needs_views(self) -> "SweepSpec":
        # the minority's extra copy is another augmentation view of the same image
        if True in (_values(self.space.get("oversample", False)) or []):
            augments = _values(self.space.get("augment", TRIAL_DEFAULTS["augment"])) or []
            if "none" in augments or self.views < 2:
                raise ValueError(f"space.oversample: true needs augment other than none (got {augments}) "
                                 f"and views >= 2 (got {self.views}): the extra copy is another augmentation view")
        return self

    @model_validator(mode="after")
    def _one_balance_key(self) -> "SweepSpec":
        # class_weighted is the older spelling of balance (true: class, false: none): one of them, not both
        if "balance" in self.space and "class_weighted" in self.space:
            raise ValueError("space.balance: set balance or class_weighted, not both "
                             "(class_weighted: true is balance: class, false is balance: none)")
        return self

    @model_validator(mode="after")
    def _something_to_search(self) -> "SweepSpec":
        if self.num_samples > 1 and not self.searched():
            raise ValueError(f"num_samples is {self.num_samples} but every parameter in `space` is fixed, so "
                             f"the trials would repeat one configuration; set num_samples: 1 or give a "
                             f"parameter a choice or a range")
        return self

    @model_validator(mode="after")
    def _lung_pool_head_stage_only(self) -> "SweepSpec":
        # pool: lungs trains the head on lung-masked vectors of the cached maps; the fine-tuning stage
        # and the cam_layer full-model scoring pool globally (trainable.train.finetune, trainable.cam.camlayer)
        if "lungs" not in (_values(self.space.get("pool", TRIAL_DEFAULTS["pool"])) or []):
            return self
        ft = _values(self.space.get("ft_epochs", TRIAL_DEFAULTS["ft_epochs"]))
        if ft is None or any(v > 0 for v in ft):
            raise ValueError("space.pool: lungs needs ft_epochs: 0 (fine-tuning with lung pooling is not implemented)")
        if self.cam_layer != "final":
            raise ValueError(f"space.pool: lungs needs cam_layer: final (got {self.cam_layer!r}; "
                             f"Grad-CAM at another layer with lung pooling is not implemented)")
        return self

    def searched(self) -> list[str]:
        """The parameters the search draws (a choice or a range); the rest are fixed."""
        return [k for k, p in self.space.items() if isinstance(p, (Choice, Uniform, LogUniform, RandInt))]

    def total_epochs(self) -> int:
        """Head epochs plus the largest `ft_epochs` the space can draw: ASHA's max_t."""
        param = self.space.get("ft_epochs", TRIAL_DEFAULTS["ft_epochs"])
        values = _values(param)
        return self.epochs + int(max(values) if values is not None else param.randint[1] - 1)

    @model_validator(mode="after")
    def _cam_layer_of_every_backbone(self) -> "SweepSpec":
        if self.cam_layer == "final":  # every backbone has it; checking other layers builds models
            return self
        from trainable.cam.camlayer import describe_cam_layers, valid_cam_layers

        for backbone in self.choices("backbone"):
            if self.cam_layer not in valid_cam_layers(backbone):
                raise ValueError(f"cam_layer {self.cam_layer!r} is not a layer of backbone {backbone!r}; "
                                 f"valid: {describe_cam_layers(backbone)}")
        return self

    def settings(self) -> Settings:
        return Settings(folds=self.folds, epochs=self.epochs, seed=self.seed, base_size=self.base_size,
                        input_size=self.input_size, views=self.views, edge_band=self.edge_band,
                        atlas_threshold=self.atlas_threshold, cam_target=self.cam_target,
                        group_column=self.group_column, min_cell=self.min_cell, cam_layer=self.cam_layer,
                        lung_masks=self.lung_masks)

    def choices(self, key: str) -> list[Any]:
        """Every value `key` can take (categorical keys only; the default when not in the space)."""
        param = self.space.get(key, TRIAL_DEFAULTS[key])
        values = _values(param)
        if values is None:
            raise SpaceError(f"space.{key} must be a fixed value or a `choice` (it selects cached features)")
        return values


def _values(param: Any) -> list[Any] | None:
    """The finite set of values of a parameter, or None for a continuous range."""
    if isinstance(param, Choice):
        return list(param.choice)
    if isinstance(param, (Uniform, LogUniform, RandInt)):
        return None
    return [param]


def _check_range(key: str, param: Any) -> None:
    """A range is checked at its ends against the parameter's rule: a trial must never be the first
    to find that `lr: {uniform: [-0.01, 0.01]}` can draw a negative learning rate. Both ends of a
    uniform / loguniform count (a sampler may return `high`); randint's high is exclusive."""
    if isinstance(param, Uniform):
        kind, bounds, ends = "uniform", param.uniform, param.uniform
    elif isinstance(param, LogUniform):
        kind, bounds, ends = "loguniform", param.loguniform, param.loguniform
    elif isinstance(param, RandInt):
        kind, bounds, ends = "randint", param.randint, (param.randint[0], param.randint[1] - 1)
    else:
        return
    for end in ends:
        try:
            _check_value(key, end)
        except ValueError as e:
            rule = str(e).removesuffix(f" (got {end!r})")
            raise ValueError(f"{key}: {kind} [{bounds[0]}, {bounds[1]}] can draw {end!r}, but {rule}") from None


def _check_value(key: str, value: Any) -> None:
    _check_ft_value(key, value)
    _check_lever_value(key, value)
    if key == "backbone":
        try:
            get_spec(value)  # a registry alias or any timm.list_models() name[.tag]
        except UnknownBackboneError as e:
            raise ValueError(str(e)) from None
    if key == "augment" and value not in AUGMENT_POLICIES:
        raise ValueError(f"augment must be one of {list(AUGMENT_POLICIES)} (got {value!r})")
    if key == "crop_margin" and not (isinstance(value, (int, float)) and 0 <= value < 0.4):
        raise ValueError(f"crop_margin must be a number in [0, 0.4) (got {value!r})")
    if key in ("hidden", "batch_size") and not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{key} must be an integer >= 1 (got {value!r})")
    if key == "dropout" and not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ValueError(f"dropout must be in [0, 1) (got {value!r})")
    if key == "lr" and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"lr must be a number > 0 (got {value!r})")
    if key == "weight_decay" and not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f"weight_decay must be a number >= 0 (got {value!r})")
    if key == "weights" and not (value in ("imagenet", "random") or Path(str(value)).suffix):
        raise ValueError(f"weights must be 'imagenet', 'random' or a weights file path (got {value!r})")


def _check_lever_value(key: str, value: Any) -> None:
    """The training levers (README "Training levers"): balance, cam_loss, cam_loss_region, pool."""
    if key == "balance" and value not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {list(BALANCE_MODES)} (got {value!r})")
    if key == "cam_loss" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"cam_loss must be a number >= 0 (got {value!r})")
    if key == "cam_loss_region" and value not in CAM_LOSS_REGIONS:
        raise ValueError(f"cam_loss_region must be one of {list(CAM_LOSS_REGIONS)} (got {value!r})")
    if key == "pool" and value not in POOLS:
        raise ValueError(f"pool must be one of {list(POOLS)} (got {value!r})")


def _check_ft_value(key: str, value: Any) -> None:
    """The fine-tuning and oversampling keys (trainable.train.finetune, trainable.train.oversample)."""
    if key in ("oversample", "class_weighted") and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false (got {value!r})")
    if key in ("ft_epochs", "patience") and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{key} must be an integer >= 0 (got {value!r})")
    if key == "ft_lr" and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"ft_lr must be a number > 0 (got {value!r})")
    if key == "ft_blocks" and not (value == "all" or (isinstance(value, int) and not isinstance(value, bool)
                                                       and value >= 1)):
        raise ValueError(f"ft_blocks must be 'all' or an integer >= 1 (the last N backbone blocks; got {value!r})")
    if key == "ft_bn" and value not in ("frozen", "train"):
        raise ValueError(f"ft_bn must be 'frozen' or 'train' (got {value!r})")


def resolve_space_file(space: str | Path) -> Path:
    """A path, or the name of a file in spaces/ (`default` → spaces/default.yaml)."""
    p = Path(space)
    if p.is_file():
        return p
    named = SPACES_DIR / f"{space}.yaml"
    if named.is_file():
        return named
    raise SpaceError(f"space file {space} not found (neither a file nor a name in {SPACES_DIR})")


def load_space(space: str | Path) -> SweepSpec:
    path = resolve_space_file(space)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # yaml's own str() of a mark spans three lines
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpaceError(f"{path}: not valid YAML ({where}{problem})") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: the top level must be a mapping of settings (got {type(raw).__name__})")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise SpaceError(f"{path}: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    """One line: the field path, the rule and the value received (union noise dropped)."""
    errors = e.errors()
    # a union error reports every member; prefer the message that is not a type mismatch
    rank = {"value_error": 0, "extra_forbidden": 1, "missing": 2}
    best = min(errors, key=lambda x: -1 if x["type"] != "missing" and _own_member(x["loc"]) else rank.get(x["type"], 3))
    loc = ".".join(str(p) for p in best["loc"] if not str(p)[0].isupper() and "[" not in str(p))
    msg = best["msg"].removeprefix("Value error, ")
    if best["type"] == "extra_forbidden":
        msg = "unknown key (not allowed here)"
    head, sep, rest = msg.partition(": ")
    if loc == "space" and sep and head in TRIAL_DEFAULTS:  # a parameter's own rule names it: space.lr
        loc, msg = f"space.{head}", rest
    value = best.get("input")
    shown = "" if best["type"] in ("value_error", "missing") else f" (got {value!r})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"   # model-level rules name their fields


def _own_member(loc: tuple) -> bool:
    """The error comes from the union member the user wrote: `Choice` then its own `choice` field
    (so `{choice: []}` is told it needs a value, not that `choice` is unknown to `Uniform`)."""
    names = [str(p) for p in loc]
    return any(a[0].isupper() and a.lower() == b for a, b in zip(names, names[1:]))


def tune_param_space(spec: SweepSpec) -> dict[str, Any]:
    """The space as Ray Tune search domains; fixed values pass through as constants."""
    from ray import tune  # here: loading and checking a space file needs no Ray
    out: dict[str, Any] = {}
    for key, param in spec.space.items():
        if isinstance(param, Choice):
            out[key] = tune.choice(param.choice)
        elif isinstance(param, Uniform):
            out[key] = tune.uniform(*param.uniform)
        elif isinstance(param, LogUniform):
            out[key] = tune.loguniform(*param.loguniform)
        elif isinstance(param, RandInt):
            out[key] = tune.randint(*param.randint)
        else:
            out[key] = param
    return out
