"""A fake sd-scripts checkout for tests: the four training scripts, each printing what the real ones print.

The real scripts need real weights and a GPU; what Nyx depends on is their command line (`--config_file`,
`--dataset_config`) and their output: a tqdm bar on stderr redrawn with `\\r` only, `epoch N/M`,
`saving checkpoint: PATH` and `model saved.` on stdout, and their failure modes. The behaviour is chosen
by the `FAKE_SD_MODE` environment variable:

- `ok` (default): trains `max_train_steps` steps over 2 epochs, with > 64 KiB of `\\r`-only bar redraws,
  saves `<output_dir>/<output_name>.safetensors`;
- `slow`: 0.1 s a step for a long time; SIGINT (Ctrl+C, a Nyx `stop`) saves `-interrupted` and exits 0;
- `traceback`: a Python traceback, exit 1; `oom`: a CUDA out-of-memory traceback, exit 1;
- `nodata`: "No data found", exit 0 (what sd-scripts does with an empty dataset folder);
- `nosave`: trains and exits 0 without saving.

`FAKE_SD_LORA=PATH` makes each save a copy of that (real) LoRA file instead of placeholder bytes, for a
workflow whose next stage loads it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPTS = ("train_network.py", "sdxl_train_network.py", "flux_train_network.py", "sd3_train_network.py")

FAKE_SCRIPT = r"""
import argparse, os, signal, sys, time, tomllib

parser = argparse.ArgumentParser()
parser.add_argument("--config_file", required=True)
parser.add_argument("--dataset_config", required=True)
args = parser.parse_args()
with open(args.config_file, "rb") as f:
    cfg = tomllib.load(f)
with open(args.dataset_config, "rb") as f:
    dataset = tomllib.load(f)
mode = os.environ.get("FAKE_SD_MODE", "ok")
out_dir = cfg.get("output_dir", "output")
name = cfg.get("output_name", "last")
total = int(cfg.get("max_train_steps", 20))
print("2026-11-28 16:00:00 INFO     prepare tokenizer                               train_util.py:4321")
print(f"loading {len(dataset['datasets'][0]['subsets'])} subset(s) from {args.dataset_config}")
scheduler = cfg.get("lr_scheduler_type", "")
if "." in scheduler:  # sd-scripts imports a custom scheduler by dotted path, and builds it with its args
    import importlib
    module, _, name = scheduler.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    print(f"custom scheduler {name} from {sys.modules[module].__file__}")
    import torch
    kwargs = {}
    for arg in cfg.get("lr_scheduler_args", []):
        key, _, value = arg.partition("=")
        kwargs[key] = eval(value)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cls(opt, **kwargs)

def save(suffix=""):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}{suffix}.safetensors")
    with open(path, "wb") as f:
        real = os.environ.get("FAKE_SD_LORA")  # a real LoRA file to write instead of placeholder bytes
        f.write(open(real, "rb").read() if real else b"fake lora")
    print(f"\nsaving checkpoint: {path}")
    print("model saved.")

if mode == "nodata":
    print("No data found. Please verify arguments (train_data_dir must be the parent of folders with images)")
    sys.exit(0)
if mode in ("traceback", "oom"):
    error = (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        if mode == "oom"
        else "ValueError: fake failure in the model loader"
    )
    sys.stderr.write(
        "Traceback (most recent call last):\n"
        '  File "train_network.py", line 1200, in <module>\n'
        "    trainer.train(args)\n"
        '  File "train_network.py", line 400, in train\n'
        "    raise ValueError\n"
        f"{error}\n"
    )
    sys.exit(1)

# a caching bar without a description, then the training bar
for i in range(1, 4):
    sys.stderr.write(f"\r100%|{'#' * i}| {i}/3 [00:00<00:00, 50.00it/s]")
sys.stderr.write("\n")
if mode == "slow":
    total = 100000
interrupted = False

def on_sigint(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, on_sigint)
epochs = 2
per_epoch = max(1, total // epochs)
step = 0
try:
    for epoch in range(1, epochs + 1):
        print(f"\nepoch {epoch}/{epochs}")
        for _ in range(per_epoch if epoch < epochs else total - per_epoch):
            step += 1
            loss = 0.5 / step
            pct = int(100 * step / total)
            bar = "#" * (pct // 10)
            rate = "1.33s/it" if step % 2 else "2.50it/s"
            frame = (f"\rsteps: {pct:3d}%|{bar:<10}| {step}/{total} [00:{step % 60:02d}<00:{(total - step) % 60:02d},"
                     f" {rate}, avr_loss={loss:.4f}]")
            # tqdm redraws many times a step here: > 64 KiB without a single newline
            sys.stderr.write(frame * (40 if mode == "ok" else 1))
            sys.stderr.flush()
            if mode == "slow":
                time.sleep(0.1)
except KeyboardInterrupt:
    interrupted = True
    print("\ninterrupted by SIGINT: saving")
sys.stderr.write("\n")
if mode == "nosave":
    sys.exit(0)
save("-interrupted" if interrupted else "")
sys.exit(0)
"""


def make_fake_sd_scripts(root: Path, git: bool = False) -> Path:
    """Write the fake checkout into `root`; with `git`, make it a repository with one commit (to install
    from). Returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for script in SCRIPTS:
        (root / script).write_text(FAKE_SCRIPT)
    (root / "requirements.txt").write_text("# the fake needs nothing\n")
    (root / "library").mkdir(exist_ok=True)
    (root / "library" / "__init__.py").write_text("")
    if git:
        env = {
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
            "HOME": str(root),
            "PATH": "/usr/bin:/bin:/usr/local/bin",
        }
        for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "."], ["git", "commit", "-q", "-m", "fake"]):
            subprocess.run(argv, cwd=root, check=True, env=env)
    return root
