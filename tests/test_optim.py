"""Optimizers and schedules built from the config (`trainers.native.optim`): each one trains, keeps each
parameter group's own learning rate, says clearly what is wrong with its arguments; the schedules follow
their formulas; schedule-free switches weights; pre-flight names the doubtful combinations."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from typing import Any

import pytest
import torch

from nyx_tui.config.check import check_config
from nyx_tui.config.model import (
    OptimizerKind,
    OptimizerSection,
    SchedulerKind,
    SchedulerSection,
    TrainingConfig,
)
from nyx_tui.trainers.base import NativeTrainer
from nyx_tui.trainers.native import optim

# a learning rate each optimizer makes good progress with in 30 steps of the toy problem
LRS: dict[OptimizerKind, float] = {
    OptimizerKind.ADAMW: 3e-2,
    OptimizerKind.ADAMW8BIT: 3e-2,
    OptimizerKind.LION: 3e-2,
    OptimizerKind.LION8BIT: 3e-2,
    OptimizerKind.PRODIGY: 1.0,
    OptimizerKind.CAME: 3e-2,
    OptimizerKind.ADAFACTOR: 3e-2,
    OptimizerKind.ADAMW_SCHEDULEFREE: 3e-2,
}
BUILT_IN = list(optim.SPECS)


def _problem(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A linear regression: 64 → 96 (the weight has 6,144 elements, enough for 8-bit state)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    y = x @ torch.randn(64, 96, generator=g) * 0.3 + 0.5
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 96), x, y


def _groups(model: torch.nn.Linear, lr: float, ratio: float) -> list[dict[str, Any]]:
    return [{"params": [model.weight], "lr": lr}, {"params": [model.bias], "lr": lr / ratio}]


def _train(
    opt: torch.optim.Optimizer, sched: Any, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int
):
    losses, lrs = [], []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        lrs.append([float(g["lr"]) for g in opt.param_groups])
    return losses, lrs


# ------------------------------------------------------------------------------------------ optimizers


def test_every_kind_has_a_spec_and_the_native_trainer_allows_it() -> None:
    assert set(optim.SPECS) | {OptimizerKind.CUSTOM} == set(OptimizerKind)
    assert set(NativeTrainer().optimizers) == set(OptimizerKind)


@pytest.mark.parametrize("kind", BUILT_IN, ids=lambda k: k.value)
def test_spec_names_the_real_class(kind: OptimizerKind) -> None:
    """The class path recorded in ss_optimizer is where the class really lives."""
    spec = optim.SPECS[kind]
    cls = getattr(importlib.import_module(spec.module), spec.name)
    assert f"{cls.__module__}.{cls.__qualname__}" == spec.class_path
    assert optim.metadata_name(OptimizerSection(type=kind)).startswith(spec.class_path + "(")


@pytest.mark.parametrize("kind", BUILT_IN, ids=lambda k: k.value)
def test_every_optimizer_trains_and_keeps_each_groups_lr(kind: OptimizerKind) -> None:
    lr = LRS[kind]
    ratio = 1.0 if kind is OptimizerKind.PRODIGY else 4.0  # Prodigy takes one lr for all groups
    model, x, y = _problem()
    cfg = OptimizerSection(type=kind, learning_rate=lr, weight_decay=0.0)
    opt = optim.build_optimizer(cfg, _groups(model, lr, ratio))
    assert len(opt.param_groups) == 2
    sched_kind = SchedulerKind.CONSTANT_WITH_WARMUP if kind in optim.SCHEDULE_FREE_KINDS else SchedulerKind.COSINE
    sched = optim.build_scheduler(SchedulerSection(type=sched_kind, warmup_steps=3), opt, 40)
    losses, lrs = _train(opt, sched, model, x, y, 30)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], (kind, losses[0], losses[-1])
    for a, b in lrs[1:]:
        assert a == pytest.approx(ratio * b)
    if kind in optim.SCHEDULE_FREE_KINDS:
        assert lrs[-1][0] == pytest.approx(lr)  # constant after its warmup
    else:
        assert lrs[-1][0] < lrs[5][0] < lr  # the cosine decays


@pytest.mark.parametrize("kind", [OptimizerKind.ADAMW8BIT, OptimizerKind.LION8BIT], ids=lambda k: k.value)
def test_8bit_state_for_large_tensors_only(kind: OptimizerKind) -> None:
    model, x, y = _problem()
    opt = optim.build_optimizer(OptimizerSection(type=kind, learning_rate=LRS[kind]), _groups(model, LRS[kind], 2))
    _train(opt, optim.build_scheduler(SchedulerSection(), opt, 10), model, x, y, 2)
    assert opt.state[model.weight]["state1"].dtype == torch.uint8  # 6,144 elements
    assert opt.state[model.bias]["state1"].dtype == torch.float32  # 96: under bitsandbytes' 4,096


@pytest.mark.parametrize("kind", BUILT_IN, ids=lambda k: k.value)
def test_a_wrong_extra_arg_names_the_optimizer_and_the_key(kind: OptimizerKind) -> None:
    model, _, _ = _problem()
    cfg = OptimizerSection(type=kind, args={"bogus_arg": 1})
    with pytest.raises(ValueError, match="bogus_arg") as info:
        optim.build_optimizer(cfg, _groups(model, 1e-3, 1))
    assert optim.SPECS[kind].name in str(info.value)
    assert "optimizer.args" in str(info.value)


def test_a_bad_value_the_class_rejects_is_a_clear_value_error() -> None:
    model, _, _ = _problem()
    with pytest.raises(ValueError, match=r"optimizer.args.*AdamW") as info:  # a TypeError inside torch
        optim.build_optimizer(OptimizerSection(args={"betas": "up"}), _groups(model, 1e-3, 1))
    assert isinstance(info.value, optim.OptimizerError)
    with pytest.raises(ValueError, match=r"Adafactor.*warmup_init"):  # a ValueError inside transformers
        optim.build_optimizer(OptimizerSection(type="adafactor", args={"warmup_init": True}), _groups(model, 1e-3, 1))
    with pytest.raises(ValueError, match=r"optimizer.learning_rate"):
        optim.build_optimizer(OptimizerSection(args={"lr": 0.1}), _groups(model, 1e-3, 1))


def test_args_pass_through_and_strings_read_like_sd_scripts() -> None:
    model, _, _ = _problem()
    cfg = OptimizerSection(
        type="prodigy", learning_rate=1.0, args={"d_coef": 2, "decouple": False, "betas": "0.8,0.99"}
    )
    opt = optim.build_optimizer(cfg, _groups(model, 1.0, 1))
    group = opt.param_groups[0]
    assert group["d_coef"] == 2 and group["decouple"] is False and group["betas"] == (0.8, 0.99)
    came = optim.build_optimizer(
        OptimizerSection(type="came", args={"betas": "(0.9, 0.999, 0.99)"}), _groups(model, 1e-3, 1)
    )
    assert came.param_groups[0]["betas"] == (0.9, 0.999, 0.99)
    assert optim.parse_arg("cuda") == "cuda" and optim.parse_arg("1e-3") == 1e-3 and optim.parse_arg(3) == 3


def test_section_values_each_optimizer_takes() -> None:
    model, _, _ = _problem()
    adamw = optim.build_optimizer(OptimizerSection(weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6), _groups(model, 1, 1))
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9) and adamw.param_groups[0]["eps"] == 1e-6
    lion = optim.build_optimizer(OptimizerSection(type="lion"), _groups(model, 1e-4, 1))
    assert lion.param_groups[0]["betas"] == (0.9, 0.99)  # Lion's own default, not Adam's
    lion = optim.build_optimizer(OptimizerSection(type="lion", betas=(0.95, 0.98)), _groups(model, 1e-4, 1))
    assert lion.param_groups[0]["betas"] == (0.95, 0.98)
    ada = optim.build_optimizer(OptimizerSection(type="adafactor"), _groups(model, 1e-3, 1))
    assert not ada.param_groups[0]["relative_step"] and not ada.param_groups[0]["scale_parameter"]
    # a group without an lr gets optimizer.learning_rate
    opt = optim.build_optimizer(OptimizerSection(learning_rate=5e-4), [{"params": [model.weight]}])
    assert opt.param_groups[0]["lr"] == 5e-4


def test_prodigy_refuses_different_group_lrs_and_reports_d_times_lr() -> None:
    model, x, y = _problem()
    with pytest.raises(ValueError, match=r"Prodigy.*one learning rate.*0\.5, 1"):
        optim.build_optimizer(OptimizerSection(type="prodigy", learning_rate=1.0), _groups(model, 1.0, 2))
    # a group at 0 (left out) is fine
    opt = optim.build_optimizer(
        OptimizerSection(type="prodigy", learning_rate=1.0),
        [{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.0}],
    )
    _train(opt, optim.build_scheduler(SchedulerSection(), opt, 10), model, x, y, 3)
    d = opt.param_groups[0]["d"]
    assert d > 1e-6  # it has grown from d0
    assert optim.effective_lrs(opt) == [pytest.approx(d), 0.0]


def test_adafactor_relative_step_runs_without_an_lr() -> None:
    model, x, y = _problem()
    opt = optim.build_optimizer(
        OptimizerSection(type="adafactor", args={"relative_step": True, "warmup_init": True}), _groups(model, 1e-3, 1)
    )
    assert opt.defaults["lr"] is None
    _train(opt, optim.build_scheduler(SchedulerSection(), opt, 10), model, x, y, 2)
    rate = optim.effective_lrs(opt)[0]
    assert 0 < rate < 1e-3  # its own warmup-init rate, not the group's 1e-3


def test_custom_optimizer_by_dotted_path() -> None:
    model, x, y = _problem()
    cfg = OptimizerSection(type="custom", class_path="torch.optim.SGD", learning_rate=0.2, args={"momentum": 0.9})
    opt = optim.build_optimizer(cfg, _groups(model, 0.2, 2))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    assert "weight_decay" not in cfg.args and opt.param_groups[0]["weight_decay"] == 0  # only lr + args
    losses, _ = _train(opt, optim.build_scheduler(SchedulerSection(), opt, 30), model, x, y, 30)
    assert losses[-1] < 0.5 * losses[0]
    assert optim.kohya_optimizer_type(cfg) == "torch.optim.SGD"
    for path, message in (
        ("torch.optim.Nope", "no class 'Nope'"),
        ("json.JSONDecoder", "not a torch.optim.Optimizer"),
        ("no_such_pkg_xyz.Opt", "pip install no_such_pkg_xyz"),
        ("SGD", "dotted path"),
    ):
        with pytest.raises(ValueError, match=message):
            optim.build_optimizer(OptimizerSection(type="custom", class_path=path), _groups(model, 0.1, 1))


# ---------------------------------------------------------------------------------------- schedule-free


class _Wrapped:
    """Like accelerate's AcceleratedOptimizer: the optimizer under `.optimizer`, with train/eval of its own."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.optimizer = inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def train(self) -> None:
        raise AssertionError("the helpers reach the inner optimizer")

    eval = train


def test_schedule_free_eval_swaps_in_the_averaged_weights() -> None:
    model, x, y = _problem()
    cfg = OptimizerSection(type="adamw_schedulefree", learning_rate=3e-2, betas=(0.9, 0.999))
    opt = optim.build_optimizer(cfg, _groups(model, 3e-2, 1))
    assert optim.is_schedule_free(opt) and opt.param_groups[0]["train_mode"]  # ready to step
    _train(opt, optim.build_scheduler(SchedulerSection(), opt, 20), model, x, y, 20)
    y_weights = model.weight.detach().clone()
    z = opt.state[model.weight]["z"]
    optim.eval_mode(_Wrapped(opt))
    assert not opt.param_groups[0]["train_mode"]
    # eval: x = y + (1 - 1/beta1)(z - y), the averaged iterate (schedulefree's AdamWScheduleFree.eval)
    expected_x = y_weights + (1 - 1 / 0.9) * (z - y_weights)
    assert torch.allclose(model.weight, expected_x, atol=1e-6)
    assert not torch.allclose(model.weight, y_weights, atol=1e-4)
    eval_loss = torch.nn.functional.mse_loss(model(x), y).item()
    optim.eval_mode(opt)  # idempotent
    assert torch.allclose(model.weight, expected_x, atol=1e-6)
    optim.train_mode(_Wrapped(opt))
    assert opt.param_groups[0]["train_mode"]
    assert torch.allclose(model.weight, y_weights, atol=1e-5)
    assert math.isfinite(eval_loss)
    # stepping in eval mode is the library's error, which is why the engine must call train_mode again
    optim.eval_mode(opt)
    with pytest.raises(Exception, match="train mode"):
        opt.step()


def test_mode_helpers_are_no_ops_for_other_optimizers() -> None:
    model, x, y = _problem()
    opt = optim.build_optimizer(OptimizerSection(), _groups(model, 1e-2, 1))
    _train(opt, optim.build_scheduler(SchedulerSection(), opt, 5), model, x, y, 2)
    before = model.weight.detach().clone()
    assert not optim.is_schedule_free(opt)
    optim.eval_mode(opt)
    optim.train_mode(_Wrapped(opt))
    assert torch.equal(model.weight, before)


def test_schedule_free_refuses_a_decaying_schedule() -> None:
    model, _, _ = _problem()
    opt = optim.build_optimizer(OptimizerSection(type="adamw_schedulefree"), _groups(model, 1e-3, 1))
    with pytest.raises(ValueError, match=r"schedule-free.*constant"):
        optim.build_scheduler(SchedulerSection(type="cosine"), opt, 100)


# ------------------------------------------------------------------------------------------- schedules


def _factors(sched: SchedulerSection, total: int) -> list[float]:
    return [optim.schedule_factor(sched, s, total) for s in range(total + 1)]


def test_rex_at_known_points() -> None:
    sched = SchedulerSection(type="rex", warmup_steps=10)
    f = lambda step: optim.schedule_factor(sched, step, 110)  # noqa: E731
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5)  # the warmup ramp
    assert f(10) == pytest.approx(1.0)  # t = 0
    assert f(60) == pytest.approx(2 / 3)  # t = 0.5: (1 - 0.5) / (0.5 + 0.25)
    assert f(110) == pytest.approx(0.0)  # t = 1
    assert f(85) == pytest.approx(0.25 / 0.625)  # t = 0.75
    assert f(60) > optim.schedule_factor(SchedulerSection(type="linear", warmup_steps=10), 60, 110)
    floor = SchedulerSection(type="rex", warmup_steps=10, min_lr_ratio=0.1)
    assert optim.schedule_factor(floor, 110, 110) == pytest.approx(0.1)
    assert optim.schedule_factor(floor, 60, 110) == pytest.approx(0.1 + 0.9 * 2 / 3)


def test_warmup_ramp_and_cosine_restarts() -> None:
    f = _factors(SchedulerSection(type="constant_with_warmup", warmup_steps=4), 20)
    assert f[:6] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert _factors(SchedulerSection(type="constant", warmup_steps=4), 20)[0] == 1.0  # as in diffusers: no warmup
    r = _factors(SchedulerSection(type="cosine_with_restarts", num_cycles=2), 100)
    assert r[0] == 1.0 and r[25] == pytest.approx(0.5) and r[49] < 0.01
    assert r[50] == pytest.approx(1.0)  # the restart
    assert r[75] == pytest.approx(0.5) and r[100] == 0.0
    c = _factors(SchedulerSection(type="cosine", warmup_steps=10, min_lr_ratio=0.2), 110)
    assert c[10] == pytest.approx(1.0) and c[60] == pytest.approx(0.6) and c[110] == pytest.approx(0.2)
    p = _factors(SchedulerSection(type="polynomial", power=2.0), 10)
    assert p[5] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "kind",
    ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"],
)
def test_schedules_match_diffusers(kind: str) -> None:
    """The shared kinds follow diffusers' get_scheduler (what sd-scripts uses), group by group."""
    from diffusers.optimization import get_scheduler

    total, warm = 60, 7
    sched = SchedulerSection(type=kind, warmup_steps=0 if kind == "constant" else warm, num_cycles=3, power=1.5)
    model, _, _ = _problem()
    ours_opt = torch.optim.SGD(_groups(model, 1e-2, 4), lr=1e-2)
    theirs_opt = torch.optim.SGD(_groups(model, 1e-2, 4), lr=1e-2)  # diffusers reads defaults["lr"]
    ours = optim.build_scheduler(sched, ours_opt, total)
    theirs = get_scheduler(
        kind, theirs_opt, num_warmup_steps=sched.warmup_steps, num_training_steps=total, num_cycles=3, power=1.5
    )
    tolerance = 1.01e-7 if kind == "polynomial" else 1e-12  # diffusers' polynomial ends at lr 1e-7, not 0
    for _ in range(total + 1):
        for a, b in zip(ours_opt.param_groups, theirs_opt.param_groups, strict=True):
            assert a["lr"] == pytest.approx(b["lr"], abs=tolerance)
        ours_opt.step()
        theirs_opt.step()
        ours.step()
        theirs.step()


def test_scheduler_follows_each_groups_base_lr_and_resumes() -> None:
    model, _, _ = _problem()
    opt = torch.optim.SGD(_groups(model, 1e-2, 4))
    sched = SchedulerSection(type="rex", warmup_steps=5)
    s = optim.build_scheduler(sched, opt, 50)
    for _ in range(20):
        opt.step()
        s.step()
    expected = optim.schedule_factor(sched, 20, 50)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-2 * expected), pytest.approx(2.5e-3 * expected)]
    # a resumed run: a fresh scheduler loads the step count and goes on from there
    state = s.state_dict()
    opt2 = torch.optim.SGD(_groups(model, 1e-2, 4))
    s2 = optim.build_scheduler(sched, opt2, 50)
    s2.load_state_dict(state)
    opt2.step()
    s2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * optim.schedule_factor(sched, 21, 50))
    with pytest.raises(ValueError, match="positive"):
        optim.build_scheduler(sched, opt, 0)


# ------------------------------------------------------------------------------------------- pre-flight


def _cfg(**sections: dict[str, Any]) -> TrainingConfig:
    return TrainingConfig.model_validate(sections)


def _fields(cfg: TrainingConfig) -> dict[str, str]:
    return {p.field: p.severity for p in optim.optimizer_problems(cfg)}


def test_preflight_quiet_on_ordinary_configs() -> None:
    assert optim.optimizer_problems(_cfg()) == []
    assert optim.optimizer_problems(_cfg(scheduler={"type": "cosine", "warmup_steps": 100})) == []
    assert optim.optimizer_problems(_cfg(optimizer={"type": "prodigy", "learning_rate": 1.0})) == []
    assert optim.optimizer_problems(_cfg(optimizer={"type": "adamw_schedulefree"})) == []


def test_preflight_problems() -> None:
    assert _fields(_cfg(optimizer={"type": "adamw_schedulefree"}, scheduler={"type": "cosine"})) == {
        "scheduler.type": "error"
    }
    p = optim.optimizer_problems(_cfg(optimizer={"type": "prodigy", "learning_rate": 1e-4}))
    assert [(x.field, x.severity) for x in p] == [("optimizer.learning_rate", "warning")]
    assert "1.0" in p[0].fix
    assert _fields(_cfg(optimizer={"type": "adafactor", "args": {"warmup_init": True}})) == {
        "optimizer.args.warmup_init": "error"
    }
    assert _fields(_cfg(optimizer={"type": "adafactor", "args": {"relative_step": "True"}})) == {
        "optimizer.args.relative_step": "warning"
    }
    assert _fields(_cfg(optimizer={"args": {"lr": 1}})) == {"optimizer.args.lr": "error"}
    assert _fields(_cfg(optimizer={"type": "custom"})) == {"optimizer.class_path": "error"}
    assert _fields(_cfg(optimizer={"type": "custom", "class_path": "not a path"})) == {"optimizer.class_path": "error"}
    assert _fields(_cfg(optimizer={"type": "custom", "class_path": "no_such_pkg_xyz.Opt"})) == {
        "optimizer.class_path": "error"
    }
    assert _fields(_cfg(optimizer={"type": "custom", "class_path": "torch.optim.SGD"})) == {}
    assert _fields(_cfg(optimizer={"class_path": "torch.optim.SGD"})) == {"optimizer.class_path": "warning"}
    assert _fields(_cfg(scheduler={"warmup_steps": 10})) == {"scheduler.warmup_steps": "warning"}
    assert _fields(_cfg(scheduler={"type": "cosine", "num_cycles": 3, "power": 2, "min_lr_ratio": 0.1})) == {
        "scheduler.num_cycles": "warning",
        "scheduler.power": "warning",
    }
    assert _fields(_cfg(scheduler={"min_lr_ratio": 0.1})) == {"scheduler.min_lr_ratio": "warning"}
    assert _fields(
        _cfg(
            optimizer={"type": "adamw_schedulefree", "args": {"warmup_steps": 5}},
            scheduler={"type": "constant_with_warmup", "warmup_steps": 5},
        )
    ) == {"optimizer.args.warmup_steps": "warning"}


def test_preflight_prodigy_with_several_group_lrs() -> None:
    cfg = _cfg(
        optimizer={"type": "prodigy", "learning_rate": 1.0},
        network={"train_text_encoder": True, "text_encoder_lr": 0.5},
    )
    assert _fields(cfg) == {"optimizer.type": "error"}
    same = _cfg(optimizer={"type": "prodigy", "learning_rate": 1.0}, network={"train_text_encoder": True})
    assert _fields(same) == {}


def test_preflight_names_a_missing_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optim, "_module_missing", lambda module: module.startswith("bitsandbytes"))
    for kind in ("adamw8bit", "lion8bit"):
        (p,) = optim.optimizer_problems(_cfg(optimizer={"type": kind}))
        assert p.field == "optimizer.type" and p.is_error and "pip install bitsandbytes" in p.fix
    # the kohya backends bring their own libraries
    assert optim.optimizer_problems(_cfg(optimizer={"type": "adamw8bit"}, backend={"name": "kohya"})) == []


def test_check_config_reports_optimizer_problems() -> None:
    cfg = _cfg(optimizer={"type": "adamw_schedulefree"}, scheduler={"type": "linear"})
    assert any(p.field == "scheduler.type" and p.is_error for p in check_config(cfg))


def test_preflight_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from nyx_tui.config.model import TrainingConfig\n"
        "from nyx_tui.trainers.native import optim\n"
        "optim.optimizer_problems(TrainingConfig.model_validate({'optimizer': {'type': 'adamw8bit'}}))\n"
        "optim.schedule_factor(TrainingConfig().scheduler, 3, 10)\n"
        "optim.metadata_name(TrainingConfig().optimizer)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
