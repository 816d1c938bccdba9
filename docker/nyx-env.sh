# shellcheck shell=sh
# Nyx's environment for shells the container did not start itself. Sourced (POSIX sh) by the login hook
# (/etc/profile.d/zz-nyx.sh) and by the `nyx` wrapper (/usr/local/bin/nyx).
#
# Why: sshd starts every session with a clean environment, so the image's ENV lines (NYX_HOME, HF_HOME, PATH)
# and the template's variables (HF_TOKEN, CIVITAI_TOKEN, NYX_HOME=…) are missing in an SSH login and in
# `ssh HOST nyx jobs`. on-start.sh saves the container's environment at start (a root-only file); this
# loads it, then fills in the image's defaults. Nothing here overrides a variable that is already set.

_nyx_saved="${NYX_SAVED_ENV:-/etc/nyx/env.sh}"
if [ -r "$_nyx_saved" ]; then
    # shellcheck source=/dev/null  # written at container start by on-start.sh
    . "$_nyx_saved"
fi
unset _nyx_saved

: "${NYX_HOME:=/workspace/nyx}"
: "${HF_HOME:=/workspace/hf}"
: "${PYTHONUNBUFFERED:=1}"
: "${COLORTERM:=truecolor}"
export NYX_HOME HF_HOME PYTHONUNBUFFERED COLORTERM

# The container has no locales but C.UTF-8; an SSH client's LANG/LC_* (en_US.UTF-8, or macOS's LC_CTYPE=UTF-8)
# would only produce setlocale warnings and a non-UTF-8 Python.
LANG=C.UTF-8
LC_ALL=C.UTF-8
export LANG LC_ALL

case ":${PATH:-}:" in
    *":/opt/nyx/venv/bin:"*) ;;
    *) PATH="/opt/nyx/venv/bin:${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}"; export PATH ;;
esac
