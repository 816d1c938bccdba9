"""The Docker image without Docker: the Dockerfile read as data, and its shell pieces run for real.

The Dockerfile must install what pyproject.toml's `gpu` extra lists (by installing `.[gpu]`, never a hand-kept
list that drifts), COPY files that exist, and set NYX_HOME/HF_HOME on the /workspace volume. The scripts under
docker/ run here as they run in the container: the tmux session script under a private tmux server
(TMUX_TMPDIR in a temp folder, so a developer's sessions are never touched), attached through a real pty
(`script`), inside another tmux session (VastAI's auto-tmux), and from the login hook.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
SESSION = DOCKER / "nyx-session.sh"
HOOK = DOCKER / "profile-nyx.sh"


# ------------------------------------------------------------------------------------------ the Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments and parser directives dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


# options of `pip install` / `uv pip install` that take a value (the value is not a requirement)
VALUED = {"-c", "-r", "-i", "--constraint", "--requirement", "--index-url", "--extra-index-url", "--python", "-p"}


def installs(run: str) -> list[list[str]]:
    """The requirement arguments of every `pip install` / `uv pip install` in one RUN, in order."""
    found: list[list[str]] = []
    for part in re.split(r"&&|;|\|\|", run):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        for i in range(len(words) - 1):
            if words[i] == "pip" and words[i + 1] == "install":
                args, skip = [], False
                for w in words[i + 2 :]:
                    if skip:
                        skip = False
                    elif w in VALUED:
                        skip = True
                    elif not w.startswith("-"):
                        args.append(w)
                found.append(args)
    return found


def requirement_name(arg: str) -> str:
    return canonicalize_name(re.split(r"[\s=<>!~;@\[]", arg, maxsplit=1)[0])


def extra_names(pyproject: dict, extra: str) -> set[str]:
    return {requirement_name(r) for r in pyproject["project"]["optional-dependencies"][extra]}


def image_packages(dockerfile: str, pyproject: dict) -> tuple[set[str], set[str], set[str]]:
    """(extras of the project install, names listed by hand, every package the image gets beyond the main ones)."""
    extras: set[str] = set()
    by_hand: set[str] = set()
    for word, args in instructions(dockerfile):
        if word != "RUN":
            continue
        for reqs in installs(args):
            for arg in reqs:
                project = re.fullmatch(r"(\.|/opt/nyx/src)(\[(?P<extras>[^\]]*)\])?", arg)
                if project:
                    extras |= {e.strip() for e in (project["extras"] or "").split(",") if e.strip()}
                else:
                    by_hand.add(requirement_name(arg))
    got = set(by_hand)
    for extra in extras:
        got |= extra_names(pyproject, extra)
    return extras, by_hand, got


def missing_from_image(dockerfile: str, pyproject: dict) -> set[str]:
    """Packages of the `gpu` extra the image would not get."""
    return extra_names(pyproject, "gpu") - image_packages(dockerfile, pyproject)[2]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_image_installs_exactly_the_gpu_extra(dockerfile: str, pyproject: dict) -> None:
    extras, by_hand, _ = image_packages(dockerfile, pyproject)
    assert extras == {"gpu"}, f"the image must install the project as .[gpu], not with extras {extras}"
    assert pyproject["project"]["optional-dependencies"]["gpu"], "the gpu extra is empty"
    assert missing_from_image(dockerfile, pyproject) == set()
    # by hand: only torch (its CUDA build, from its own index) and re-installs of what the extra lists
    assert by_hand <= {"torch"} | extra_names(pyproject, "gpu"), by_hand


def test_a_package_added_to_the_extra_reaches_the_image(dockerfile: str, pyproject: dict) -> None:
    grown = {**pyproject, "project": {**pyproject["project"]}}
    grown["project"]["optional-dependencies"] = {
        **pyproject["project"]["optional-dependencies"],
        "gpu": [*pyproject["project"]["optional-dependencies"]["gpu"], "xformers>=0.0.30"],
    }
    assert missing_from_image(dockerfile, grown) == set()  # .[gpu] brings it
    # the check fails for a Dockerfile that lists the extra's packages by hand
    by_hand = dockerfile.replace('".[gpu]"', '. "onnxruntime-gpu>=1.18"')
    assert by_hand != dockerfile
    assert missing_from_image(by_hand, grown) == {"xformers"}


def test_onnxruntime_is_swapped_for_the_gpu_build_and_checked(dockerfile: str) -> None:
    runs = [args for word, args in instructions(dockerfile) if word == "RUN"]
    text = "\n".join(runs)
    project = text.index('".[gpu]"')
    uninstall = text.index("uv pip uninstall onnxruntime onnxruntime-gpu")
    reinstall = text.index('"onnxruntime-gpu==${ort_gpu}"')
    check = text.index("check-image.py")
    assert project < uninstall < reinstall < check
    assert "--no-deps" in text[uninstall : reinstall + 60]


def test_torch_is_the_cuda_build_named_by_build_args(dockerfile: str) -> None:
    args = dict(a.split("=", 1) for w, a in instructions(dockerfile) if w == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_CUDA}"
    assert re.fullmatch(r"cu1[23]\d", args["TORCH_CUDA"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    torch_install = r'uv pip install --extra-index-url "\$\{TORCH_INDEX_URL\}" "torch==\$\{TORCH_VERSION\}"'
    assert re.search(torch_install, dockerfile)
    base = next(a for w, a in instructions(dockerfile) if w == "FROM" and "nvidia/cuda" in a)
    assert re.fullmatch(r"nvidia/cuda:\$\{CUDA_TAG\}-cudnn-runtime-ubuntu24\.04", base)


def test_copied_files_exist_and_are_in_the_build_context(dockerfile: str) -> None:
    ignored = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    }
    copies = [a for w, a in instructions(dockerfile) if w == "COPY" and not a.startswith("--from")]
    assert copies
    for args in copies:
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert source.strip("/").split("/")[0] not in ignored, f"COPY {source}: excluded by .dockerignore"
    for name in set(re.findall(r"/opt/nyx/docker/([\w.-]+)", dockerfile)):
        assert (DOCKER / name).is_file(), f"the Dockerfile uses docker/{name}, which does not exist"


def test_environment_puts_state_on_the_workspace_volume(dockerfile: str) -> None:
    env: dict[str, str] = {}
    for word, args in instructions(dockerfile):
        if word == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    assert env["NYX_HOME"] == "/workspace/nyx"
    assert env["HF_HOME"] == "/workspace/hf"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["COLORTERM"] == "truecolor"
    assert env["LANG"] == "C.UTF-8"
    cmd = next(a for w, a in instructions(dockerfile) if w == "CMD")
    assert cmd == '["/start.sh"]'


# ------------------------------------------------------------------------------------------------ tmux


@pytest.fixture
def tmux_env() -> Iterator[dict[str, str]]:
    """An environment whose tmux is a private server (short socket path: sockets are limited to ~100 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="nyxdk"))
    home = folder / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE", "NYX_NO_TMUX")}
    env.update(
        TMUX_TMPDIR=str(folder),
        HOME=str(home),
        NYX_TMUX_CONF=str(DOCKER / "tmux.conf"),
        NYX_SESSION_DIR=str(folder),
        NYX_SESSION_SHELL="/bin/bash",
        NYX_DOCKER_DIR=str(DOCKER),
        NYX_SAVED_ENV=str(folder / "no-saved-env"),
        TERM="xterm-256color",
    )
    yield env
    subprocess.run(["tmux", "kill-server"], env=env, capture_output=True, timeout=20)
    shutil.rmtree(folder, ignore_errors=True)


def tmux(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", *args], env=env, capture_output=True, text=True, timeout=20)


def sessions(env: dict[str, str]) -> list[str]:
    done = tmux(env, "list-sessions", "-F", "#{session_name}")
    return done.stdout.split() if done.returncode == 0 else []


def session_script(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SESSION)],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_tmux_conf_loads_and_sets_what_nyx_needs(tmux_env: dict[str, str]) -> None:
    conf = str(DOCKER / "tmux.conf")
    done = tmux(tmux_env, "-f", conf, "-L", "conf", "start-server", ";", "show", "-g", "allow-passthrough")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "allow-passthrough on"
    options = tmux(
        tmux_env, "-f", conf, "-L", "conf1", "new-session", "-d", "-s", "c", "sleep 30", ";",
        "show", "-s", "escape-time", ";", "show", "-s", "terminal-features", ";", "show", "-g", "mouse", ";",
        "show", "-g", "history-limit", ";", "show", "-g", "status-left", ";", "show", "-g", "default-terminal",
    )  # fmt: skip
    tmux(tmux_env, "-L", "conf1", "kill-server")
    assert options.returncode == 0, options.stderr
    shown = options.stdout
    escape = re.search(r"escape-time (\d+)", shown)
    assert escape and int(escape[1]) <= 10, shown
    assert re.search(r"terminal-features\[\d+\] \*:RGB", shown)
    assert "mouse on" in shown
    history = re.search(r"history-limit (\d+)", shown)
    assert history and int(history[1]) >= 50000, shown
    assert "#S" in shown
    assert 'default-terminal "tmux-256color"' in shown or "default-terminal tmux-256color" in shown
    # every line is valid for this tmux: sourcing it reports no error (and a broken copy does)
    ok = tmux(tmux_env, "-f", "/dev/null", "-L", "conf2", "start-server", ";", "source-file", conf)
    assert ok.returncode == 0, ok.stderr
    broken = Path(tmux_env["TMUX_TMPDIR"]) / "broken.conf"
    broken.write_text(Path(conf).read_text() + "set -g no-such-option on\n")
    bad = tmux(tmux_env, "-f", "/dev/null", "-L", "conf3", "start-server", ";", "source-file", str(broken))
    assert bad.returncode != 0


def test_first_call_creates_the_session_running_the_command(tmux_env: dict[str, str]) -> None:
    marker = Path(tmux_env["TMUX_TMPDIR"]) / "ran"
    command = f'echo "$TMUX_PANE" >> {shlex.quote(str(marker))}; sleep 120'
    done = session_script(tmux_env, NYX_SESSION_DETACHED="1", NYX_SESSION_COMMAND=command)
    assert done.returncode == 0, done.stderr
    assert tmux(tmux_env, "has-session", "-t", "=nyx").returncode == 0
    assert sessions(tmux_env) == ["nyx"]
    pane = tmux(tmux_env, "list-panes", "-t", "=nyx", "-F", "#{window_name}|#{pane_start_command}|#{pane_current_path}")
    name, start, cwd = pane.stdout.strip().split("|")
    assert name == "nyx"
    assert f"{SESSION} --window" in start
    assert cwd == tmux_env["NYX_SESSION_DIR"]
    # the command runs inside the pane (tmux gave it $TMUX_PANE), once
    wait_for(lambda: marker.exists() and marker.read_text().strip(), timeout=20)
    assert marker.read_text().split() == ["%0"]


def test_second_call_reenters_the_same_session(tmux_env: dict[str, str]) -> None:
    marker = Path(tmux_env["TMUX_TMPDIR"]) / "ran"
    command = f"echo run >> {shlex.quote(str(marker))}; sleep 120"
    extra = {"NYX_SESSION_DETACHED": "1", "NYX_SESSION_COMMAND": command}
    assert session_script(tmux_env, **extra).returncode == 0
    wait_for(lambda: marker.exists(), timeout=20)
    first = tmux(tmux_env, "list-panes", "-a", "-F", "#{pane_id} #{pane_pid}").stdout
    assert session_script(tmux_env, **extra).returncode == 0
    assert sessions(tmux_env) == ["nyx"]
    assert tmux(tmux_env, "list-panes", "-a", "-F", "#{pane_id} #{pane_pid}").stdout == first
    assert marker.read_text().split() == ["run"]  # not started a second time


def test_when_nyx_exits_the_window_keeps_a_shell(tmux_env: dict[str, str]) -> None:
    done = session_script(tmux_env, NYX_SESSION_DETACHED="1", NYX_SESSION_COMMAND="exit 3")
    assert done.returncode == 0, done.stderr

    def screen() -> str:
        return tmux(tmux_env, "capture-pane", "-p", "-t", "=nyx:").stdout

    wait_for(lambda: "exited (status 3)" in screen(), timeout=20)
    assert "ctrl-b d" in screen()
    wait_for(
        lambda: tmux(tmux_env, "list-panes", "-t", "=nyx", "-F", "#{pane_current_command}").stdout.strip() == "bash"
    )
    assert tmux(tmux_env, "list-panes", "-t", "=nyx", "-F", "#{pane_dead}").stdout.strip() == "0"
    assert sessions(tmux_env) == ["nyx"]


def attach_in_pty(env: dict[str, str], command: str) -> subprocess.Popen[bytes]:
    """Run a command on a real pty (util-linux `script`); stdin stays open, so no EOF reaches the pane."""
    return subprocess.Popen(
        ["script", "-qfec", command, "/dev/null"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def clients(env: dict[str, str]) -> list[str]:
    return tmux(env, "list-clients", "-F", "#{client_session}").stdout.split()


def test_attaching_from_two_terminals_shares_one_session(tmux_env: dict[str, str]) -> None:
    env = {**tmux_env, "NYX_SESSION_COMMAND": "sleep 120"}
    procs = [attach_in_pty(env, f"bash {shlex.quote(str(SESSION))}")]
    try:
        wait_for(lambda: clients(env) == ["nyx"], timeout=20)
        procs.append(attach_in_pty(env, f"bash {shlex.quote(str(SESSION))}"))  # a reconnect
        wait_for(lambda: clients(env) == ["nyx", "nyx"], timeout=20)
        assert sessions(env) == ["nyx"]
    finally:
        tmux(env, "kill-server")
        stop(procs)


def test_inside_tmux_it_switches_instead_of_nesting(tmux_env: dict[str, str]) -> None:
    """VastAI's auto-tmux (session ssh_tmux) is already around the shell: the script must move that client
    to `nyx` on the same server and return, not start a tmux client inside the pane."""
    env = tmux_env
    folder = Path(env["TMUX_TMPDIR"])
    made = tmux(env, "-f", env["NYX_TMUX_CONF"], "new-session", "-d", "-s", "ssh_tmux", "bash --norc --noprofile")
    assert made.returncode == 0, made.stderr
    procs = [attach_in_pty(env, "tmux attach -t ssh_tmux")]
    try:
        wait_for(lambda: clients(env) == ["ssh_tmux"], timeout=20)
        line = f"NYX_SESSION_COMMAND='sleep 120' bash {shlex.quote(str(SESSION))}; echo $? > {folder}/rc"
        tmux(env, "send-keys", "-t", "=ssh_tmux:", line, "Enter")
        try:
            wait_for(lambda: (folder / "rc").exists(), timeout=20)
        except AssertionError:
            raise AssertionError(tmux(env, "capture-pane", "-p", "-t", "=ssh_tmux:").stdout) from None
        assert (folder / "rc").read_text().strip() == "0"  # it returned: no client is running inside the pane
        assert clients(env) == ["nyx"]
        assert sorted(sessions(env)) == ["nyx", "ssh_tmux"]
    finally:
        tmux(env, "kill-server")
        stop(procs)


def test_without_a_terminal_it_creates_the_session_and_says_how_to_attach(tmux_env: dict[str, str]) -> None:
    done = session_script(tmux_env, NYX_SESSION_COMMAND="sleep 120")
    assert done.returncode == 0
    assert "ssh -t HOST nyx-session" in done.stderr
    assert sessions(tmux_env) == ["nyx"]


# ------------------------------------------------------------------------------------------ the login hook


def login(env: dict[str, str], shell: str = "bash --noprofile --norc -i") -> str:
    """Source the hook in a shell on a pty, as sshd's login shell does; what the shell printed after it."""
    inner = f"{shell} -c '. {shlex.quote(str(HOOK))}; echo NOT_ENTERED'"
    done = subprocess.run(
        ["script", "-qfec", inner, "/dev/null"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout


@pytest.fixture
def ssh_env(tmux_env: dict[str, str]) -> dict[str, str]:
    """An interactive SSH login's environment; the session is created detached so the hook's run returns."""
    return {**tmux_env, "SSH_TTY": "/dev/pts/77", "NYX_SESSION_DETACHED": "1", "NYX_SESSION_COMMAND": "sleep 120"}


@pytest.mark.parametrize("shell", ["bash --noprofile --norc -i", "sh -i"])
def test_login_hook_opens_the_session_for_an_ssh_login(ssh_env: dict[str, str], shell: str) -> None:
    out = login(ssh_env, shell)
    assert "NOT_ENTERED" not in out, out  # the login went into the session and ended with it
    assert sessions(ssh_env) == ["nyx"]


@pytest.mark.parametrize(
    ("why", "change"),
    [
        ("inside tmux", {"TMUX": "/tmp/elsewhere/default,123,0"}),
        ("opted out", {"NYX_NO_TMUX": "1"}),
        ("not an SSH login", {"SSH_TTY": ""}),
    ],
)
def test_login_hook_leaves_other_shells_alone(ssh_env: dict[str, str], why: str, change: dict[str, str]) -> None:
    out = login({**ssh_env, **change})
    assert "NOT_ENTERED" in out, f"{why}: {out}"
    assert sessions(ssh_env) == [], why


def test_login_hook_leaves_non_interactive_shells_and_the_opt_out_file_alone(ssh_env: dict[str, str]) -> None:
    assert "NOT_ENTERED" in login(ssh_env, "bash --noprofile --norc")  # scp, rsync, ssh HOST cmd
    (Path(ssh_env["HOME"]) / ".no_nyx_tmux").touch()
    assert "NOT_ENTERED" in login(ssh_env)
    assert sessions(ssh_env) == []


# ------------------------------------------------------------------------------ container start, environment


def test_on_start_makes_the_layout_and_saves_the_environment(tmp_path: Path) -> None:
    ws, home = tmp_path / "ws", tmp_path / "home"
    home.mkdir()
    saved = tmp_path / "etc" / "env.sh"
    token = "hf_it's $secret"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "NYX_WORKSPACE": str(ws),
        "NYX_HOME": str(ws / "nyx"),
        "HF_HOME": str(ws / "hf"),
        "NYX_SAVED_ENV": str(saved),
        "NYX_NO_HOST_KEYS": "1",  # never write host keys into this machine's /etc/ssh
        "HF_TOKEN": token,
        "PUBLIC_KEY": "ssh-ed25519 AAAA me",
    }
    done = subprocess.run(["bash", str(DOCKER / "on-start.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout + done.stderr
    for name in ("datasets", "models", "nyx", "hf", "output"):
        assert (ws / name).is_dir(), name
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert "PUBLIC_KEY" not in saved.read_text()
    assert (home / ".no_auto_tmux").exists()  # VastAI's auto-tmux off: Nyx's session takes the login

    def shell_sees(script: str, **extra: str) -> str:
        clean = {"PATH": "/usr/bin:/bin", "NYX_SAVED_ENV": str(saved), **extra}
        return subprocess.run(
            ["sh", "-c", f". {shlex.quote(str(DOCKER / 'nyx-env.sh'))}; {script}"],
            env=clean,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout

    assert shell_sees('printf %s "$HF_TOKEN"') == token  # an SSH login gets the template's token, quotes and all
    assert shell_sees('printf %s "$HF_TOKEN"', HF_TOKEN="mine") == "mine"  # a value already set wins
    assert shell_sees('printf %s "$NYX_HOME"') == str(ws / "nyx")
    assert shell_sees('printf %s "$LANG $COLORTERM $PATH"') == "C.UTF-8 truecolor /opt/nyx/venv/bin:/usr/bin:/bin"
    # no saved file (a plain `docker exec`): the image's defaults
    assert shell_sees('printf %s "$NYX_HOME $HF_HOME"', NYX_SAVED_ENV=str(tmp_path / "none")) == (
        "/workspace/nyx /workspace/hf"
    )

    (home / ".no_auto_tmux").unlink()
    again = subprocess.run(
        ["bash", str(DOCKER / "on-start.sh")], env={**env, "NYX_NO_TMUX": "1"}, capture_output=True, timeout=30
    )
    assert again.returncode == 0
    assert not (home / ".no_auto_tmux").exists()  # opted out of Nyx's session: VastAI's tmux stays


def test_public_key_lines_are_split_and_written_once(tmp_path: Path) -> None:
    keys = "ssh-ed25519 AAAAC3Nza1 alice@laptop ssh-rsa AAAAB3Nza2 bob ecdsa-sha2-nistp256 AAAAE2V3 carol"
    target = tmp_path / "ssh" / "authorized_keys"
    script = f'. {shlex.quote(str(DOCKER / "start.sh"))}; write_authorized_keys {shlex.quote(str(target))} "$KEYS"'
    for _ in range(2):
        done = subprocess.run(
            ["bash", "-c", script], env={"PATH": os.environ["PATH"], "KEYS": keys}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    assert target.read_text().splitlines() == [
        "ssh-ed25519 AAAAC3Nza1 alice@laptop",
        "ssh-rsa AAAAB3Nza2 bob",
        "ecdsa-sha2-nistp256 AAAAE2V3 carol",
    ]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700


def test_wrapper_runs_nyx_with_the_container_environment(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "nyx"
    fake.write_text('#!/bin/sh\nprintf "%s|%s|%s" "$NYX_HOME" "$HF_HOME" "$*"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "NYX_DOCKER_DIR": str(DOCKER), "NYX_VENV": str(venv), "NYX_SAVED_ENV": "/none"}
    done = subprocess.run(
        ["sh", str(DOCKER / "nyx-wrapper.sh"), "jobs", "--json"], env=env, capture_output=True, text=True
    )
    assert done.stdout == "/workspace/nyx|/workspace/hf|jobs --json"
    real = {**env, "NYX_VENV": str(Path(sys.executable).parent.parent)}
    version = subprocess.run(
        ["sh", str(DOCKER / "nyx-wrapper.sh"), "--version"], env=real, capture_output=True, text=True
    )
    assert version.stdout.startswith("nyx "), version.stderr


def test_image_check_fails_on_cpu_builds() -> None:
    """The build's last step, run in this CPU environment, must refuse it and name each wrong wheel."""
    done = subprocess.run(
        [sys.executable, str(DOCKER / "check-image.py"), "--torch-cuda", "cu130"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "the CPU onnxruntime is installed" in done.stderr
    assert "no CUDAExecutionProvider" in done.stderr
    assert "is a CPU build" in done.stderr
