"""Sample prompts in sd-scripts' prompt syntax, parsed into typed values. Torch-free: the config check uses it.

A prompt line is the prompt text followed by options, each introduced by ` --`:

    a photo of mychar, smiling --n blurry, lowres --w 512 --h 768 --s 28 --l 7.5 --d 42 --ss euler_a

`--n` negative prompt, `--w`/`--h` width and height in pixels, `--s` sampling steps, `--l` CFG scale, `--d`
seed, `--ss` sampler (sd-scripts' names, `sampling.sampler`'s choices). Option names are case-insensitive, as
in sd-scripts. Unlike sd-scripts, which skips what it cannot read with a log line, an unknown option or a bad
value is an error that names the prompt and the option: a typo should not cost a run its samples. Lines that
are empty or start with `#` are comments (sd-scripts' prompt files allow them).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

from nyx_tui.config.errors import Problem
from nyx_tui.config.model import Sampler, TrainingConfig

MIN_SIZE, MAX_SIZE = 64, 8192
MAX_STEPS = 1000
OPTIONS: dict[str, str] = {
    "n": "negative prompt",
    "w": "width in pixels",
    "h": "height in pixels",
    "s": "sampling steps",
    "l": "CFG scale",
    "d": "seed",
    "ss": "sampler",
}
NEEDS_SCIPY = frozenset({Sampler.LMS, Sampler.K_LMS})  # diffusers' LMS sampler integrates with scipy
_OPTION = re.compile(r"(?P<name>[A-Za-z]+)(?:\s+(?P<value>.*))?$", re.DOTALL)


class PromptError(ValueError):
    """A prompt line that cannot be read; the message names the option and says what it wants."""


@dataclass(frozen=True)
class SamplePrompt:
    """One sample prompt. `None` means "not given": the renderer fills in the run's default."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    scale: float | None = None
    seed: int | None = None
    sampler: Sampler | None = None


def is_comment(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def _int(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise PromptError(f"--{name} ({OPTIONS[name]}) needs a whole number, not {value!r}") from None
    if not low <= number <= high:
        raise PromptError(f"--{name} ({OPTIONS[name]}) must be between {low} and {high}, not {number}")
    return number


def parse_prompt(line: str) -> SamplePrompt:
    """One prompt line → `SamplePrompt`; raises `PromptError` for an unknown option or a bad value."""
    text, *parts = line.strip().split(" --")
    text = text.strip()
    if text.startswith("--"):
        raise PromptError("the prompt text comes first, before any --option")
    if not text:
        raise PromptError("the prompt text is empty")
    values: dict[str, str] = {}
    for part in parts:
        found = _OPTION.match(part.strip())
        name = found.group("name").lower() if found else part.strip().split(" ")[0]
        if not found or name not in OPTIONS:
            known = ", ".join(f"--{k} ({v})" for k, v in OPTIONS.items())
            raise PromptError(f"unknown option --{name}; the options are {known}")
        value = (found.group("value") or "").strip()
        if not value:
            raise PromptError(f"--{name} ({OPTIONS[name]}) has no value")
        if name in values:
            raise PromptError(f"--{name} ({OPTIONS[name]}) is given twice")
        values[name] = value

    def number(name: str, low: int, high: int) -> int | None:
        return _int(name, values[name], low, high) if name in values else None

    return SamplePrompt(
        prompt=text,
        negative=values.get("n", ""),
        width=number("w", MIN_SIZE, MAX_SIZE),
        height=number("h", MIN_SIZE, MAX_SIZE),
        steps=number("s", 1, MAX_STEPS),
        scale=_scale(values["l"]) if "l" in values else None,
        seed=number("d", 0, 2**63 - 1),
        sampler=_sampler(values["ss"]) if "ss" in values else None,
    )


def _scale(value: str) -> float:
    try:
        scale = float(value)
    except ValueError:
        raise PromptError(f"--l (CFG scale) needs a number, not {value!r}") from None
    if not 0.0 <= scale <= 100.0:
        raise PromptError(f"--l (CFG scale) must be between 0 and 100, not {scale}")
    return scale


def _sampler(value: str) -> Sampler:
    try:
        return Sampler(value.lower())
    except ValueError:
        names = ", ".join(s.value for s in Sampler)
        raise PromptError(f"--ss (sampler) {value!r} is not one of: {names}") from None


def parse_prompts(lines: list[str]) -> list[SamplePrompt]:
    """Every prompt of `sampling.prompts` (comments left out); the first bad line raises `PromptError`
    naming its index and text."""
    out: list[SamplePrompt] = []
    for i, line in enumerate(lines):
        if is_comment(line):
            continue
        try:
            out.append(parse_prompt(line))
        except PromptError as e:
            raise PromptError(f"sampling.prompts[{i}] ({_short(line)}): {e}") from None
    return out


def _short(line: str, width: int = 60) -> str:
    line = line.strip()
    return repr(line if len(line) <= width else line[: width - 1] + "…")


def prompt_problems(cfg: TrainingConfig) -> list[Problem]:
    """Pre-flight for the `sampling` section: every bad prompt line, and a schedule with nothing to render."""
    sp = cfg.sampling
    out: list[Problem] = []
    good = 0
    for i, line in enumerate(sp.prompts):
        if is_comment(line):
            continue
        try:
            prompt = parse_prompt(line)
            good += 1
            if (prompt.sampler or sp.sampler) in NEEDS_SCIPY and importlib.util.find_spec("scipy") is None:
                key = f"sampling.prompts[{i}]" if prompt.sampler else "sampling.sampler"
                out.append(
                    Problem(
                        key, "the lms sampler needs scipy, which is not installed", "pip install scipy, or use euler"
                    )
                )
        except PromptError as e:
            out.append(
                Problem(
                    f"sampling.prompts[{i}]",
                    f"{_short(line)}: {e}",
                    'write it as "prompt text --n negative --w 512 --h 512 --s 28 --l 7.5 --d 42" (every --option '
                    "is optional)",
                )
            )
    scheduled = sp.every_n_steps or sp.every_n_epochs or sp.sample_at_first
    if scheduled and not good and not out:
        which = next(f"sampling.{n}" for n in ("every_n_steps", "every_n_epochs", "sample_at_first") if getattr(sp, n))
        out.append(
            Problem(
                which,
                "samples are scheduled but sampling.prompts has no prompt",
                'add one, e.g. prompts = ["a photo of mychar --d 1"], or turn the schedule off',
                severity="warning",
            )
        )
    if sp.every_n_steps and sp.every_n_epochs:
        out.append(
            Problem(
                "sampling.every_n_steps",
                "is ignored: sampling.every_n_epochs is set too and decides when samples are rendered (as in "
                "sd-scripts)",
                "set one of the two to 0",
                severity="warning",
            )
        )
    return out
