"""The training loop's own features on the tiny SD1.5 model: exact resume, epochs instead of steps,
keep-last-N, the validation loss, the EMA of the LoRA weights, and two processes through `accelerate launch`.

Runs are shared (module fixtures) to keep the suite short: `run_a` is a 2-epoch (10-step) run that saves
often and validates every step; `run_b` resumes it from its step-4 state. Everything is on the CPU with a
fixed seed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import nyx_tui.config
from nyx_tui.config.check import check_config
from nyx_tui.config.io import dumps_config
from nyx_tui.config.model import TrainingConfig
from nyx_tui.jobs.events import read_events
from nyx_tui.jobs.jobdir import JobDir, create_job
from nyx_tui.trainers.base import NativeTrainer

torch = pytest.importorskip("torch")

PRESET = Path(nyx_tui.config.__file__).parent / "presets" / "demo-tiny-cpu.toml"
EMA_DECAY = 0.8


# ----------------------------------------------------------------------------------------- helpers


def make_config(assets: dict[str, Path], **sections: dict[str, Any]) -> TrainingConfig:
    data = tomllib.loads(PRESET.read_text())
    data["model"]["pretrained"] = str(assets["model"])
    data["dataset"]["subsets"] = [{"image_dir": str(assets["dataset"])}]
    data["scheduler"] = {"type": "constant", "warmup_steps": 0}
    data["network"].update(dim=4, alpha=2.0)
    data["saving"].update(every_n_steps=0, precision="float")
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return TrainingConfig.model_validate(data)


def start_job(root: Path, cfg: TrainingConfig) -> JobDir:
    """A job run by the backend's own worker command (accelerate launch with num_processes > 1), as the
    supervisor runs it: in the job folder."""
    job = create_job("train", "t", ["native"], config_toml=dumps_config(cfg), root=root)
    proc = subprocess.run(NativeTrainer().argv(cfg), cwd=job.path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return job


def events_of(job: JobDir, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(job.events_path) if e["kind"] == kind]


def losses_of(job: JobDir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events_of(job, "step")}


def val_losses(job: JobDir) -> dict[int, float]:
    return {e["step"]: e["value"] for e in events_of(job, "metric") if e["name"] == "val_loss"}


def saved(job: JobDir, what: str) -> list[Path]:
    return [Path(e["path"]) for e in events_of(job, "artifact") if e["what"] == what]


def load(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- the shared runs

# dropout, augmentation, accumulation, warmup + cosine, EMA and validation all on: every source of
# randomness and every piece of state a resume has to restore. 24 images, 5 held out → 19, batch 2 →
# 10 batches an epoch (the last one short), accumulation 2 → 5 steps an epoch; 2 epochs → 10 steps.
RUN_A = {
    "training": {
        "max_steps": 0,
        "max_epochs": 2,
        "gradient_accumulation_steps": 2,
        "ema_decay": EMA_DECAY,
        "validate_every_n_steps": 1,
    },
    "dataset": {"validation_split": 0.2, "flip_aug": True, "shuffle_caption": True, "random_crop": True},
    "network": {"dropout": 0.1},
    "scheduler": {"type": "cosine", "warmup_steps": 2},
    "saving": {"every_n_steps": 2, "every_n_epochs": 1, "keep_last_n": 4},
}


@pytest.fixture(scope="module")
def run_a(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> JobDir:
    return start_job(tmp_path_factory.mktemp("a"), make_config(assets, **RUN_A))


@pytest.fixture(scope="module")
def run_b(run_a: JobDir, assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> JobDir:
    """`run_a` again, resumed from the state it saved at step 4 (mid-epoch)."""
    (state,) = [p for p in saved(run_a, "state") if p.name == "demo-step000004-state"]
    cfg = make_config(assets, **{**RUN_A, "training": {**RUN_A["training"], "resume": str(state)}})
    return start_job(tmp_path_factory.mktemp("b"), cfg)


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_resume_continues_exactly(run_a: JobDir, run_b: JobDir) -> None:
    """A run of 10 steps and the same run resumed from its step-4 state give the same losses, learning
    rates, validation losses and final weights. Tolerance: none — on the CPU, with the same seed, threads
    and kernels, a resume is bit-identical (a state saved by `stop` is written by the same code)."""
    a, b = losses_of(run_a), losses_of(run_b)
    assert sorted(a) == list(range(1, 11)) and sorted(b) == list(range(5, 11))
    assert {s: a[s] for s in b} == b
    lrs_a = {e["step"]: e["lr"] for e in events_of(run_a, "step")}
    assert all(e["lr"] == lrs_a[e["step"]] for e in events_of(run_b, "step"))
    assert {s: v for s, v in val_losses(run_a).items() if s > 4} == val_losses(run_b)
    logs = " | ".join(e["message"] for e in events_of(run_b, "log"))
    assert "resumed from" in logs and "at step 4" in logs
    warned = [e["message"] for e in events_of(run_b, "log") if e["level"] == "warning"]
    assert not [m for m in warned if "state" in m or "epoch" in m or "process" in m], warned
    for name in ("demo.safetensors", "demo-state/model.safetensors", "demo-state/ema.safetensors"):
        wa, wb = load(run_a.output_dir / name), load(run_b.output_dir / name)
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa), name
    info_b = json.loads((run_b.output_dir / "demo-state" / "nyx_state.json").read_text())
    info_a = json.loads((run_a.output_dir / "demo-state" / "nyx_state.json").read_text())
    for key in ("step", "epoch", "batches_done", "total_steps", "steps_per_epoch"):
        assert info_a[key] == info_b[key], key


@pytest.mark.slow
def test_state_records_where_the_run_was(run_a: JobDir) -> None:
    info = json.loads((run_a.output_dir / "demo-step000004-state" / "nyx_state.json").read_text())
    assert (info["step"], info["epoch"], info["batches_done"]) == (4, 1, 8)  # 4 steps × 2 micro-batches
    assert (info["steps_per_epoch"], info["total_steps"], info["num_processes"]) == (5, 10, 1)
    assert info["network"]["kind"] == "lora" and info["network"]["dim"] == 4 and info["ema"] is True
    assert info["lora"].endswith("demo-step000004.safetensors")


def test_resume_preflight(assets: dict[str, Path], tmp_path: Path) -> None:
    """`nyx config check` refuses a missing or incomplete state folder and one made for another network."""

    def problems(folder: Path, **network: Any) -> list[str]:
        cfg = make_config(assets, training={"resume": str(folder)}, network=network)
        return [f"{p.field}: {p.message}" for p in check_config(cfg) if p.is_error]

    assert any("training.resume: not found" in p for p in problems(tmp_path / "nowhere"))
    folder = tmp_path / "output" / "demo-state"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    assert any("not a complete training state" in p for p in problems(folder))
    info = {"step": 3, "epoch": 1, "network": {"family": "sd15", "kind": "lora", "dim": 4, "alpha": 2.0}}
    (folder / "nyx_state.json").write_text(json.dumps(info))
    assert not [p for p in problems(folder) if "resume" in p or "network." in p]
    # a job folder instead of the state: the fix names the state inside it
    cfg = make_config(assets, training={"resume": str(tmp_path)})
    (job_problem,) = [p for p in check_config(cfg) if p.field == "training.resume"]
    assert str(folder) in job_problem.fix
    (bad,) = [p for p in problems(folder, dim=8) if p.startswith("network.dim")]
    assert "trained with 4" in bad


# --------------------------------------------------------------------------- saving, keep_last_n


@pytest.mark.slow
def test_keep_last_n_keeps_the_last_intermediate_saves_and_the_final(run_a: JobDir) -> None:
    # saves: steps 2 and 4, the end of epoch 1 (step 5), steps 6 and 8; the final one at 10. keep_last_n = 4.
    names = [p.name for p in saved(run_a, "lora")]
    assert names == [
        "demo-step000002.safetensors",
        "demo-step000004.safetensors",
        "demo-epoch000001.safetensors",
        "demo-step000006.safetensors",
        "demo-step000008.safetensors",
        "demo.safetensors",
    ]
    on_disk = sorted(p.name for p in run_a.output_dir.iterdir())
    assert on_disk == sorted(
        f"{stem}{ext}"
        for stem in ("demo-step000004", "demo-epoch000001", "demo-step000006", "demo-step000008", "demo")
        for ext in (".safetensors", "-state")
    )
    removed = [e["message"] for e in events_of(run_a, "log") if e["message"].startswith("removed ")]
    assert len(removed) == 2 and all("demo-step000002" in m for m in removed)


# ------------------------------------------------------------------------------- steps or epochs


@pytest.mark.slow
def test_epochs_decide_the_run_length(run_a: JobDir) -> None:
    """2 epochs of 5 steps (19 images, batch 2, accumulation 2): 10 steps, the epoch number on each, the
    end of epoch 1 at step 5 (where the short last batch makes a step of one micro-batch)."""
    (start,) = events_of(run_a, "start")
    assert start["total_epochs"] == 2 and "total_steps" not in start
    steps = events_of(run_a, "step")
    assert [(e["step"], e["epoch"], e["total"]) for e in steps] == [(s, 1 + (s - 1) // 5, 10) for s in range(1, 11)]
    info = json.loads((run_a.output_dir / "demo-epoch000001-state" / "nyx_state.json").read_text())
    assert (info["step"], info["epoch"], info["batches_done"]) == (5, 1, 10)


def test_steps_and_epochs_exclude_each_other(assets: dict[str, Path]) -> None:
    from nyx_tui.config.errors import ConfigError
    from nyx_tui.config.io import parse_config

    base = dumps_config(make_config(assets))
    with pytest.raises(ConfigError, match="exactly one decides"):
        parse_config(base.replace("max_epochs = 0", "max_epochs = 3"))
    with pytest.raises(ConfigError, match="exactly one decides"):
        parse_config(base.replace("max_steps = 2400", "max_steps = 0"))
    assert parse_config(base.replace("max_steps = 2400", "max_steps = 0").replace("max_epochs = 0", "max_epochs = 3"))


# -------------------------------------------------------------------------------------- validation


@pytest.mark.slow
def test_validation_loss_is_a_fixed_measure(run_a: JobDir) -> None:
    """val_loss at step 0 and after step 1 (learning rate 0: the warmup's first step) are at the same
    weights and are equal; later ones move with the weights."""
    val = val_losses(run_a)
    assert sorted(val) == list(range(0, 11))
    assert val[0] == val[1]
    assert len({val[s] for s in range(1, 11)}) == 10
    assert events_of(run_a, "step")[0]["lr"] == [0.0]
    logs = " | ".join(e["message"] for e in events_of(run_a, "log"))
    assert "19 images (+5 held out for validation)" in logs


def test_validation_split_holds_out_whole_images() -> None:
    from nyx_tui.trainers.native.validation import split

    class Item:
        def __init__(self, image: str) -> None:
            self.image = image

    items = [Item(f"{i}.png") for i in range(10) for _ in range(3)]  # 3 repeats each
    train, val = split(items, 0.2, seed=1)
    assert len(val) == 2 and len({i.image for i in val}) == 2
    assert not {i.image for i in train} & {i.image for i in val} and len(train) == 24
    assert [i.image for i in split(items, 0.2, seed=1)[1]] == [i.image for i in val]
    assert [i.image for i in split(items, 0.2, seed=2)[1]] != [i.image for i in val]
    assert split(items, 0.0, seed=1) == (items, [])


# --------------------------------------------------------------------------------------------- EMA


@pytest.mark.slow
def test_ema_is_saved_and_follows_the_decay(run_a: JobDir) -> None:
    """The LoRA saved at step 6 holds EMA_6 = d·EMA_5 + (1 − d)·W_6: EMA_5 is the epoch-1 LoRA (step 5),
    W_6 the raw weights in the step-6 training state. And EMA_6 is not the raw W_6."""
    ema5 = load(run_a.output_dir / "demo-epoch000001.safetensors")
    ema6 = load(run_a.output_dir / "demo-step000006.safetensors")
    raw6 = load(run_a.output_dir / "demo-step000006-state" / "model.safetensors")

    def kohya(peft_key: str) -> str:  # down_blocks.0….to_q.lora_A.default.weight → lora_unet_down_blocks_0_…
        module, _, part = peft_key.partition(".lora_")
        side = {"A.default.weight": "lora_down.weight", "B.default.weight": "lora_up.weight"}[part]
        return "lora_unet_" + module.replace(".", "_") + "." + side

    assert raw6 and all(kohya(k) in ema6 for k in raw6)
    for key, w in raw6.items():
        expected = EMA_DECAY * ema5[kohya(key)] + (1 - EMA_DECAY) * w
        assert (ema6[kohya(key)] - expected).abs().max() <= 1e-6, key
    assert max((ema6[kohya(k)] - w).abs().max() for k, w in raw6.items()) > 1e-4
    ema_state = load(run_a.output_dir / "demo-step000006-state" / "ema.safetensors")
    assert len(ema_state) == len(raw6)


# ------------------------------------------------------------------------------------ two processes


def test_argv_launches_accelerate_for_several_processes(assets: dict[str, Path]) -> None:
    one = NativeTrainer().argv(make_config(assets))
    assert one == [sys.executable, "-m", "nyx_tui.trainers.native", "."]
    two = NativeTrainer().argv(make_config(assets, training={"num_processes": 2}))
    assert two[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert two[3:7] == ["--multi_gpu", "--num_processes", "2", "--num_machines"]
    assert two[-3:] == ["-m", "nyx_tui.trainers.native", "."]


@pytest.mark.slow
def test_two_processes_train_one_lora(assets: dict[str, Path], tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo): both ranks train on their own
    shard, the weights stay identical, and one LoRA (and one state) is saved."""
    cfg = make_config(assets, training={"max_steps": 4, "num_processes": 2}, saving={"every_n_steps": 2})
    job = start_job(tmp_path, cfg)
    logs = [e["message"] for e in events_of(job, "log")]
    assert any("2 process(es)" in m for m in logs)
    shards = [m.split("first batch ", 1)[1] for m in logs if m.startswith("process ")]
    assert len(shards) == 2 and shards[0] != shards[1]
    assert "the trained weights are identical on the 2 processes" in logs
    assert [e["step"] for e in events_of(job, "step")] == [1, 2, 3, 4]  # one event a step, not one a rank
    assert [p.name for p in saved(job, "lora")] == ["demo-step000002.safetensors", "demo.safetensors"]
    state = job.output_dir / "demo-state"
    assert {"random_states_0.pkl", "random_states_1.pkl", "nyx_state.json"} <= {p.name for p in state.iterdir()}
    assert json.loads((state / "nyx_state.json").read_text())["num_processes"] == 2


@pytest.mark.slow
def test_full_bf16_trains_bf16_weights(assets: dict[str, Path], tmp_path: Path) -> None:
    """training.full_bf16: the LoRA weights (and so their optimizer state) are bf16; on the CPU the run has
    no autocast, so everything, the frozen model too, computes in bf16. The loss stays finite, the LoRA
    moves and is saved at the requested precision."""
    cfg = make_config(
        assets, training={"max_steps": 4, "mixed_precision": "bf16", "full_bf16": True}, saving={"save_state": True}
    )
    job = start_job(tmp_path, cfg)
    assert all(math.isfinite(v) for v in losses_of(job).values()) and len(losses_of(job)) == 4
    lora = load(saved(job, "lora")[-1])
    assert {t.dtype for t in lora.values()} == {torch.float32}  # saving.precision = "float"
    assert any(float(t.abs().max()) > 0 for k, t in lora.items() if "lora_up" in k)  # trained (up starts at 0)
    (state,) = saved(job, "state")
    weights = load(state / "model.safetensors")
    assert weights and {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_full_bf16_needs_bf16_mixed_precision() -> None:
    from nyx_tui.trainers.native.loss_check import loss_problems

    cfg = TrainingConfig.model_validate({"training": {"full_bf16": True, "mixed_precision": "fp16"}})
    (problem,) = [p for p in loss_problems(cfg) if p.field == "training.full_bf16"]
    assert problem.is_error and 'mixed_precision = "bf16"' in problem.fix
    ok = TrainingConfig.model_validate({"training": {"full_bf16": True, "mixed_precision": "bf16"}})
    assert not [p for p in loss_problems(ok) if p.field == "training.full_bf16"]


@pytest.mark.slow
def test_a_resume_with_a_new_learning_rate_uses_it(
    run_a: JobDir, assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The state restores the old learning rates (optimizer groups, LambdaLR's base_lrs); the engine puts
    the config's back at the loaded step of the schedule: double the lr, double every resumed step's lr."""
    (state,) = [p for p in saved(run_a, "state") if p.name == "demo-step000004-state"]
    lr = make_config(assets, **RUN_A).optimizer.learning_rate
    cfg = make_config(
        assets,
        **{**RUN_A, "training": {**RUN_A["training"], "resume": str(state)}, "optimizer": {"learning_rate": 2 * lr}},
    )
    run_c = start_job(tmp_path_factory.mktemp("c"), cfg)
    lrs_a = {e["step"]: e["lr"] for e in events_of(run_a, "step")}
    lrs_c = {e["step"]: e["lr"] for e in events_of(run_c, "step")}
    assert sorted(lrs_c) == list(range(5, 11))
    for step, got in lrs_c.items():
        assert got == pytest.approx([2 * x for x in lrs_a[step]], rel=1e-9), step
