"""Workflows and sweeps: the plan checks (a bad stage is refused before anything runs), then real runs on the
tiny SD1.5 model through the CLI, the orchestrator job, the queue and the scheduler: a two-stage workflow whose
stage 2 starts from stage 1's LoRA, a failing stage that stops the rest, a cancel that reaches the running
stage, and a 4-trial sweep ranked by validation loss."""

from __future__ import annotations

import asyncio
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import run_nyx, wait_for
from PIL import Image
from safetensors.numpy import load_file

import nyx_tui.config
from nyx_tui.jobs.events import read_events
from nyx_tui.jobs.jobdir import TERMINAL, JobDir, list_jobs
from nyx_tui.lora.grid import layout
from nyx_tui.workflows.plan import PlanError, combinations, load_sweep, load_workflow, short_params
from nyx_tui.workflows.run import rank

PRESET = Path(nyx_tui.config.__file__).parent / "presets" / "demo-tiny-cpu.toml"


def write_base(assets: dict[str, Path], folder: Path, **sections: dict[str, Any]) -> Path:
    """A short run of the demo preset on the tiny model (6 steps, constant schedule, final save only)."""
    data: dict[str, Any] = tomllib.loads(PRESET.read_text())
    data["model"]["pretrained"] = str(assets["model"])
    data["dataset"]["subsets"] = [{"image_dir": str(assets["dataset"])}]
    data["scheduler"] = {"type": "constant", "warmup_steps": 0}
    data["training"].update(max_steps=6)
    data["saving"].update(every_n_steps=0, output_name="wf")
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = folder / "base.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jobs_by_kind(home: Path) -> dict[str, list[JobDir]]:
    out: dict[str, list[JobDir]] = {}
    for job in list_jobs(home / "jobs"):
        out.setdefault(job.spec()["kind"], []).append(job)
    return out


def record_of(job: JobDir) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((job.path / "workflow.json").read_text())
    return data


# -------------------------------------------------------------------------------------------- the plans


TWO_STAGES = """
[workflow]
name = "two"
base = "base.toml"

[[stage]]
name = "first"
[stage.set]
optimizer.learning_rate = 1e-3

[[stage]]
name = "second"
from = "lora"
[stage.set]
optimizer.learning_rate = 1e-12
"""


def test_workflow_plan_overlays_each_stage_on_the_base(assets: dict[str, Path], tmp_path: Path) -> None:
    write_base(assets, tmp_path)
    plan = load_workflow(write(tmp_path / "wf.toml", TWO_STAGES))
    assert plan.kind == "workflow" and plan.name == "two" and [s.name for s in plan.stages] == ["first", "second"]
    first, second = (tomllib.loads(s.config_toml) for s in plan.stages)
    assert first["optimizer"]["learning_rate"] == 1e-3 and second["optimizer"]["learning_rate"] == 1e-12
    assert first["network"]["dim"] == 8 and first["training"]["max_steps"] == 6  # the base shows through
    assert first["saving"]["output_name"] == "wf-stage1" and second["saving"]["output_name"] == "wf-stage2"
    assert [s.start_from for s in plan.stages] == ["none", "lora"]
    assert plan.stages[1].overlay == {"optimizer.learning_rate": 1e-12}
    assert first["model"]["pretrained"] == str(assets["model"])


@pytest.mark.parametrize(
    ("stage2", "field", "words"),
    [
        ('from = "lora"\n[stage.set]\nnetwork.dim = 16', "network.dim", "same adapter shape"),
        ('from = "state"\n[stage.set]\ntraining.max_steps = 4', "training.max_steps", "set it above 6"),
        ("[stage.set]\nnetwork.dmi = 4", "network.dmi", "did you mean network.dim"),
        ("[stage.set]\noptimizer.learning_rate = -1", "optimizer.learning_rate", ""),
        ('from = "weights"', "from", "lora, state, none"),
        ('[stage.set]\nnetwork.weights = "x.safetensors"', "network.weights", 'from = "none"'),
    ],
)
def test_a_bad_stage_is_refused_before_anything_runs(
    assets: dict[str, Path], nyx_home: Path, tmp_path: Path, stage2: str, field: str, words: str
) -> None:
    write_base(assets, tmp_path)
    text = f'[workflow]\nbase = "base.toml"\n[[stage]]\nname = "a"\n[[stage]]\nname = "b"\n{stage2}\n'
    path = write(tmp_path / "wf.toml", text)
    with pytest.raises(PlanError) as raised:
        load_workflow(path)
    assert any(field in p.field and words in f"{p.message} {p.fix}" for p in raised.value.problems), raised.value
    proc = run_nyx("workflow", "run", str(path), home=nyx_home)
    assert proc.returncode == 2 and field in proc.stderr, proc.stderr
    assert not list_jobs(nyx_home / "jobs")  # nothing was started, not even stage 1


def test_state_chaining_saves_the_state_the_next_stage_resumes(assets: dict[str, Path], tmp_path: Path) -> None:
    write_base(assets, tmp_path, saving={"save_state": False})
    text = TWO_STAGES.replace('from = "lora"', 'from = "state"') + "training.max_steps = 12\n"
    plan = load_workflow(write(tmp_path / "wf.toml", text))
    assert tomllib.loads(plan.stages[0].config_toml)["saving"]["save_state"] is True
    assert any("saves its training state" in n for n in plan.notes)
    first = '[[stage]]\nname = "a"\nfrom = "lora"\n'
    with pytest.raises(PlanError, match="no stage before it"):
        load_workflow(write(tmp_path / "bad.toml", f'[workflow]\nbase = "base.toml"\n{first}'))


SWEEP = """
[sweep]
name = "lr-dim"
base = "base.toml"
steps = {steps}
[sweep.params]
optimizer.learning_rate = [1e-4, 3e-3]
network.dim = [2, 4]
"""


def test_sweep_plan_grid_budget_and_held_out_images(assets: dict[str, Path], tmp_path: Path) -> None:
    write_base(assets, tmp_path, scheduler={"type": "cosine", "warmup_steps": 100}, training={"max_steps": 400})
    plan = load_sweep(write(tmp_path / "sweep.toml", SWEEP.format(steps=8)))
    assert plan.kind == "sweep" and plan.params == ["optimizer.learning_rate", "network.dim"]
    assert [s.params for s in plan.stages] == [
        {"optimizer.learning_rate": 1e-4, "network.dim": 2},
        {"optimizer.learning_rate": 1e-4, "network.dim": 4},
        {"optimizer.learning_rate": 3e-3, "network.dim": 2},
        {"optimizer.learning_rate": 3e-3, "network.dim": 4},
    ]
    configs = [tomllib.loads(s.config_toml) for s in plan.stages]
    assert {c["training"]["max_steps"] for c in configs} == {8}  # the shared budget
    assert {c["scheduler"]["warmup_steps"] for c in configs} == {0}  # 100 ≥ 8 would not even validate
    assert {c["dataset"]["validation_split"] for c in configs} == {0.2}
    assert len({c["saving"]["output_name"] for c in configs}) == 4
    assert [c["network"]["dim"] for c in configs] == [2, 4, 2, 4]
    assert any("held out" in n for n in plan.notes) and any("warmup" in n for n in plan.notes)


def test_random_sweep_draws_inside_the_ranges_and_is_seeded() -> None:
    params = {"optimizer.learning_rate": {"log_uniform": [1e-5, 1e-3]}, "network.dim": {"choice": [4, 8, 16]}}
    a = combinations(params, "random", 6, seed=3)
    assert a == combinations(params, "random", 6, seed=3) and a != combinations(params, "random", 6, seed=4)
    assert len(a) == 6 and len({json.dumps(t, sort_keys=True) for t in a}) == 6
    assert all(1e-5 <= t["optimizer.learning_rate"] <= 1e-3 and t["network.dim"] in (4, 8, 16) for t in a)
    assert len(combinations({"network.dim": [4, 8]}, "random", 5, seed=0)) == 2  # the space is smaller


def test_bad_sweep_files_say_what_to_fix(assets: dict[str, Path], tmp_path: Path) -> None:
    write_base(assets, tmp_path)
    cases = {
        '[sweep]\nbase = "base.toml"\n': "names nothing to sweep",
        '[sweep]\nbase = "base.toml"\n[sweep.params]\nnetwork.dim = {log_uniform = [1, 2]}\n': 'method = "random"',
        '[sweep]\nbase = "base.toml"\nmethod = "random"\n[sweep.params]\nnetwork.dim = {uniform = [5, 1]}\n': "range",
        '[sweep]\nbase = "base.toml"\n[sweep.params]\nnetwork.dimm = [1, 2]\n': "did you mean network.dim",
        '[sweep]\nbase = "nope.toml"\n[sweep.params]\nnetwork.dim = [1, 2]\n': "file not found",
        '[sweep]\nbase = "base.toml"\nsteps = 0\n[sweep.params]\nnetwork.dim = [1, 2]\n': "whole number",
    }
    for text, words in cases.items():
        with pytest.raises(PlanError) as raised:
            load_sweep(write(tmp_path / "sweep.toml", text))
        said = " ".join(f"{p.field} {p.message} {p.fix}" for p in raised.value.problems)
        assert words in said, (text, said)


def test_rank_orders_by_validation_then_final_loss_failed_last() -> None:
    def trial(i: int, state: str, val: float | None, final: float | None) -> dict[str, Any]:
        return {"index": i, "name": f"trial {i + 1}", "state": state, "val_loss": val, "final_loss": final}

    trials = [
        trial(0, "failed", None, 0.01),
        trial(1, "finished", 0.30, 0.20),
        trial(2, "finished", 0.25, 0.90),
        trial(3, "finished", None, 0.10),
        trial(4, "running", None, None),
    ]
    table = rank(trials)
    assert [r["trial"] for r in table] == ["trial 3", "trial 2", "trial 4", "trial 1"]
    assert [r["rank"] for r in table] == [1, 2, 3, 4]


# -------------------------------------------------------------------------------------------- real runs


def test_two_stage_workflow_stage_two_starts_from_stage_one(
    assets: dict[str, Path], nyx_home: Path, tmp_path: Path
) -> None:
    """Stage 2 trains at a learning rate of 1e-12: its LoRA can only equal stage 1's if it started from it (a
    fresh adapter starts with zero up-weights, which stage 1's are not)."""
    write_base(assets, tmp_path)
    path = write(tmp_path / "wf.toml", TWO_STAGES)
    proc = run_nyx("workflow", "run", str(path), home=nyx_home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = jobs_by_kind(nyx_home)
    (wf,) = kinds["workflow"]
    stage1, stage2 = sorted(kinds["train"], key=lambda j: j.spec()["created"])
    for child, name in ((stage1, "first"), (stage2, "second")):
        spec = child.spec()
        assert spec["parent"] == wf.id and spec["stage"] == name and spec["queue"] is True
        assert child.status()["state"] == "finished"
    record = record_of(wf)
    assert record["state"] == "finished" and record["kind"] == "workflow"
    s1, s2 = record["stages"]
    assert (s1["job"], s2["job"]) == (stage1.id, stage2.id) and s1["state"] == s2["state"] == "finished"
    lora1 = next(a["path"] for a in s1["artifacts"] if a["what"] == "lora")
    lora2 = next(a["path"] for a in s2["artifacts"] if a["what"] == "lora")
    assert Path(lora1).is_file() and Path(lora2).is_file() and lora1 != lora2
    assert all(isinstance(s["final_loss"], float) and math.isfinite(s["final_loss"]) for s in (s1, s2))
    # stage 2 was given stage 1's LoRA, and its engine loaded it
    assert tomllib.loads(stage2.config_path.read_text())["network"]["weights"] == lora1
    logs = [e["message"] for e in read_events(stage2.events_path) if e["kind"] == "log"]
    assert any(f"the adapter starts from {lora1}" in m for m in logs), logs
    w1, w2 = load_file(lora1), load_file(lora2)
    ups = [k for k in w1 if k.endswith("lora_up.weight")]
    assert ups and any(abs(w1[k]).max() > 1e-4 for k in ups)  # stage 1 trained: not a fresh adapter
    assert w1.keys() == w2.keys()
    assert all(abs(w1[k] - w2[k]).max() < 1e-6 for k in w1)
    # the workflow's own events list both LoRAs, and `nyx workflow show` says so
    arts = [e["path"] for e in read_events(wf.events_path) if e["kind"] == "artifact" and e["what"] == "lora"]
    assert arts == [lora1, lora2]
    shown = run_nyx("workflow", "show", wf.id, home=nyx_home)
    assert shown.returncode == 0 and "first" in shown.stdout and lora2 in shown.stdout, shown.stdout


def test_a_failing_stage_stops_the_rest(assets: dict[str, Path], nyx_home: Path, tmp_path: Path) -> None:
    """Stage 1 diverges (learning rate 10): the workflow fails naming it, and stage 2 never becomes a job."""
    write_base(assets, tmp_path, training={"max_steps": 60})
    text = """
[workflow]
base = "base.toml"
[[stage]]
name = "too hot"
[stage.set]
optimizer.learning_rate = 10.0
quality = {warmup_steps = 3, patience_steps = 2, smoothing_steps = 2}
[[stage]]
name = "never"
"""
    proc = run_nyx("workflow", "run", str(write(tmp_path / "wf.toml", text)), home=nyx_home, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = jobs_by_kind(nyx_home)
    (wf,) = kinds["workflow"]
    (stage1,) = kinds["train"]  # no job for stage 2
    assert stage1.status()["state"] == "failed"
    record = record_of(wf)
    assert record["state"] == "failed" and [s["state"] for s in record["stages"]] == ["failed", "skipped"]
    assert "stage 1 (too hot) failed" in record["error"] and "training stopped early" in record["error"]
    (end,) = [e for e in read_events(wf.events_path) if e["kind"] == "end"]
    assert end["state"] == "failed" and "stage 1 (too hot)" in end["error"]
    assert "learning_rate" in (end.get("hint") or "")  # the stage's own fix comes along


def test_cancelling_a_workflow_cancels_its_running_stage(
    assets: dict[str, Path], nyx_home: Path, tmp_path: Path
) -> None:
    write_base(assets, tmp_path, training={"max_steps": 5000})
    path = write(tmp_path / "wf.toml", TWO_STAGES)
    proc = run_nyx("workflow", "run", str(path), "--detach", home=nyx_home)
    assert proc.returncode == 0, proc.stderr
    wf_id = proc.stdout.strip().splitlines()[-1]
    wf = JobDir(nyx_home / "jobs" / wf_id)

    def stage1_stepping() -> JobDir | None:
        kids = jobs_by_kind(nyx_home).get("train", [])
        return kids[0] if kids and kids[0].last_event("step") else None

    stage1 = wait_for(stage1_stepping, timeout=120)
    assert isinstance(stage1, JobDir)
    assert run_nyx("stop", wf_id, "--cancel", home=nyx_home).returncode == 0
    wait_for(lambda: wf.effective_state() in TERMINAL and stage1.effective_state() in TERMINAL, timeout=120)
    assert wf.status()["state"] == "cancelled" and stage1.status()["state"] == "cancelled"
    record = record_of(wf)
    assert record["state"] == "cancelled" and record["stages"][1]["state"] == "skipped"
    assert len(jobs_by_kind(nyx_home)["train"]) == 1


def test_sweep_of_four_configs_is_ranked_by_validation_loss(
    assets: dict[str, Path], nyx_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each trial renders one 2-step sample at its last step: the sweep puts them side by side, best first."""
    monkeypatch.setenv("NYX_GPU", "none")
    write_base(assets, tmp_path, sampling={"prompts": ["a red circle --s 2 --d 7"], "every_n_steps": 6})
    path = write(tmp_path / "sweep.toml", SWEEP.format(steps=6))
    proc = run_nyx("sweep", str(path), home=nyx_home, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = jobs_by_kind(nyx_home)
    (sweep,) = kinds["sweep"]
    trials = kinds["train"]
    assert len(trials) == 4
    assert all(t.spec()["queue"] is True and t.spec()["parent"] == sweep.id for t in trials)  # queued jobs
    record = record_of(sweep)
    assert record["state"] == "finished" and [t["state"] for t in record["trials"]] == ["finished"] * 4
    table = record["table"]
    vals = [r["val_loss"] for r in table]
    assert len(table) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in vals)
    assert vals == sorted(vals) and [r["rank"] for r in table] == [1, 2, 3, 4]
    assert len({r["job"] for r in table}) == 4 and all(Path(r["lora"]).is_file() for r in table)
    # each trial's validation loss is its job's last val_loss metric; each trained its own values
    for row in table:
        child = JobDir(nyx_home / "jobs" / row["job"])
        metrics = [e["value"] for e in read_events(child.events_path) if e["kind"] == "metric"
                   and e["name"] == "val_loss"]  # fmt: skip
        assert metrics[-1] == row["val_loss"]
        cfg = tomllib.loads(child.config_path.read_text())
        assert cfg["optimizer"]["learning_rate"] == row["params"]["optimizer.learning_rate"]
        assert cfg["network"]["dim"] == row["params"]["network.dim"]
        assert cfg["training"]["max_steps"] == 6 and cfg["dataset"]["validation_split"] == 0.2
    # the sample grid: one tile per trial, in ranked order
    grid = sweep.path / "samples.png"
    assert record["grid"] == str(grid) and all(Path(r["sample"]).is_file() for r in table)
    with Image.open(table[0]["sample"]) as tile:
        size = tile.size
    lay = layout(*size, [short_params(r["params"]) for r in table], [""])
    with Image.open(grid) as im:
        assert im.size == lay.size
        for col, row in enumerate(table):
            with Image.open(row["sample"]) as tile:
                assert im.crop(lay.box(0, col)).tobytes() == tile.convert("RGB").tobytes()
    assert any(e["kind"] == "artifact" and e["what"] == "image" for e in read_events(sweep.events_path))
    best = JobDir(nyx_home / "jobs" / table[0]["job"])
    assert (sweep.path / "best.toml").read_text() == best.config_path.read_text()
    shown = run_nyx("workflow", "show", sweep.id, home=nyx_home)
    assert shown.returncode == 0 and "ranked by validation loss" in shown.stdout
    assert shown.stdout.index(Path(table[0]["lora"]).name) < shown.stdout.index(Path(table[3]["lora"]).name)
    # the TUI opens the sweep job as its view: the trials and the ranked table, from the real record
    asyncio.run(_tui_shows_the_sweep(sweep.id, table))


async def _tui_shows_the_sweep(job_id: str, table: list[dict[str, Any]]) -> None:
    from test_tui_workflow import open_from_home, rows

    from nyx_tui.app import NyxApp

    async with NyxApp().run_test(size=(140, 40)) as pilot:
        screen = await open_from_home(pilot, job_id)
        ranked = rows(screen, "wf-table")
        assert [r[0] for r in ranked] == ["1", "2", "3", "4"]
        assert [r[4] for r in ranked] == [t["job"] for t in table]
        assert ranked[0][2] == f"{table[0]['val_loss']:.4f}"
        assert len(rows(screen, "wf-stages")) == 4


def test_a_stage_can_resume_the_state_of_the_one_before(
    assets: dict[str, Path], nyx_home: Path, tmp_path: Path
) -> None:
    """from = "state": stage 2 continues stage 1's run (step 7 onwards, to its 10 steps in all)."""
    write_base(assets, tmp_path)
    text = TWO_STAGES.replace('from = "lora"', 'from = "state"') + "training.max_steps = 10\n"
    proc = run_nyx("workflow", "run", str(write(tmp_path / "wf.toml", text)), home=nyx_home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = jobs_by_kind(nyx_home)
    stage1, stage2 = sorted(kinds["train"], key=lambda j: j.spec()["created"])
    state = next(a["path"] for a in record_of(kinds["workflow"][0])["stages"][0]["artifacts"] if a["what"] == "state")
    assert tomllib.loads(stage2.config_path.read_text())["training"]["resume"] == state
    steps = [e["step"] for e in read_events(stage2.events_path) if e["kind"] == "step"]
    assert steps == [7, 8, 9, 10]
    assert [e["step"] for e in read_events(stage1.events_path) if e["kind"] == "step"] == [1, 2, 3, 4, 5, 6]


def test_a_kohya_workflow_hands_stage_one_s_lora_to_sd_scripts(
    assets: dict[str, Path], nyx_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sd-scripts backend (a fake sd-scripts tree that saves a real LoRA of the tiny model): stage 2's
    sd-scripts config carries stage 1's LoRA as `network_weights`, after Nyx checked it fits the model."""
    from fake_sd_scripts import make_fake_sd_scripts
    from lora_files import ALPHA, DIM, attached, config, save_nyx_lora

    _, network = attached(config(assets["model"]))
    lora = save_nyx_lora(network, tmp_path / "real.safetensors")
    monkeypatch.setenv("FAKE_SD_LORA", str(lora))
    monkeypatch.setenv("NYX_KOHYA_DIRECT", "1")
    tree = make_fake_sd_scripts(tmp_path / "sd-scripts")
    write_base(assets, tmp_path, backend={"name": "kohya", "path": str(tree)}, network={"dim": DIM, "alpha": ALPHA})
    text = '[workflow]\nbase = "base.toml"\n[[stage]]\nname = "a"\n[[stage]]\nname = "b"\n'
    proc = run_nyx("workflow", "run", str(write(tmp_path / "wf.toml", text)), home=nyx_home, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = jobs_by_kind(nyx_home)
    stage1, stage2 = sorted(kinds["train"], key=lambda j: j.spec()["created"])
    assert stage1.spec()["backend"] == stage2.spec()["backend"] == "kohya"
    saved = stage1.output_dir / "wf-stage1.safetensors"
    assert record_of(kinds["workflow"][0])["stages"][0]["lora"] == str(saved)
    sd_config = tomllib.loads((stage2.path / "kohya" / "config.toml").read_text())
    assert sd_config["network_weights"] == str(saved)
    assert "network_weights" not in tomllib.loads((stage1.path / "kohya" / "config.toml").read_text())
