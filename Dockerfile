# syntax=docker/dockerfile:1
# Nyx for a rented GPU box (VastAI, RunPod, any Docker host with the NVIDIA container runtime): docs/cloud.md.
#
#   docker build -t ghcr.io/OWNER/nyx:latest .
#
# The default is CUDA 13.0 (torch's cu130 wheels): Turing to Blackwell (T4, RTX 20xx-50xx, A100, L40S, H100,
# B200), on hosts whose NVIDIA driver is 580 or newer. For older drivers, or Pascal/Volta cards, build the CUDA
# 12.6 variant (torch 2.13's other CUDA build; no Blackwell):
#
#   docker build --build-arg CUDA_TAG=12.6.3 --build-arg TORCH_CUDA=cu126 -t ghcr.io/OWNER/nyx:cu126 .
#
# Python 3.11 comes from uv (python-build-standalone), not the deadsnakes PPA: the same interpreter on any base,
# no Launchpad at build time, a pinned patch release, and uv installs the multi-GB wheels several times faster.
# Ubuntu 24.04 because tmux must be 3.3+ for allow-passthrough (22.04 ships 3.2a).

ARG CUDA_TAG=13.0.1
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM nvidia/cuda:${CUDA_TAG}-cudnn-runtime-ubuntu24.04

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}

# openssh-server for /start.sh's sshd (RunPod; VastAI brings its own setup), rsync for copying datasets and
# LoRAs in and out, tini as PID 1 (reaps the detached jobs' orphans), ncurses-term for the terminfo of kitty,
# alacritty, wezterm… (tmux refuses a TERM it has no entry for). The host keys openssh-server's install makes
# are deleted: every container makes its own at start, so a public image never carries private keys.
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        tmux git openssh-client openssh-server curl ca-certificates rsync tini ncurses-term less nano \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub \
    && printf '%s\n' \
        '# Nyx: keys only (start.sh writes PUBLIC_KEY to authorized_keys); a client may ask for no tmux' \
        'PermitRootLogin prohibit-password' \
        'PasswordAuthentication no' \
        'AcceptEnv NYX_NO_TMUX COLORTERM' \
        > /etc/ssh/sshd_config.d/nyx.conf

COPY --from=uv /uv /uvx /usr/local/bin/

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    VIRTUAL_ENV=/opt/nyx/venv \
    PATH=/opt/nyx/venv/bin:$PATH \
    NYX_HOME=/workspace/nyx \
    HF_HOME=/workspace/hf \
    PYTHONUNBUFFERED=1 \
    COLORTERM=truecolor \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8

# Python and torch first: the biggest layers, and they change least. uv looks in an extra index before the
# default one (PyPI) and takes a package from the first index that has it: torch from PyTorch's CUDA index,
# any dependency that index does not mirror from PyPI. The constraints file keeps torch at
# this build when Nyx's dependencies are resolved, and picks the onnxruntime-gpu builds made for this CUDA
# (1.27 and later are CUDA 13 builds, 1.26 and earlier CUDA 12). It stays in the image for later installs:
#   uv pip install -c /opt/nyx/constraints.txt PACKAGE
RUN --mount=type=cache,target=/root/.cache/uv \
    uv python install "${PYTHON_VERSION}" \
    && uv venv --seed --python "${PYTHON_VERSION}" /opt/nyx/venv \
    && uv pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && printf 'torch==%s\n' "${TORCH_VERSION}" > /opt/nyx/constraints.txt \
    && case "${TORCH_CUDA}" in \
        cu12*) echo 'onnxruntime-gpu<1.27' ;; \
        cu13*) echo 'onnxruntime-gpu>=1.27' ;; \
        *) echo "TORCH_CUDA=${TORCH_CUDA}: expected cu12x or cu13x" >&2; exit 1 ;; \
    esac >> /opt/nyx/constraints.txt

# Nyx with the extras the image is for: exactly what pyproject.toml's `gpu` extra lists (tests/test_docker.py
# checks that nothing is listed here by hand instead).
COPY pyproject.toml README.md /opt/nyx/src/
COPY nyx_tui /opt/nyx/src/nyx_tui
WORKDIR /opt/nyx/src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install -c /opt/nyx/constraints.txt ".[gpu]"

# onnxruntime (a main dependency, the CPU build) and onnxruntime-gpu (the gpu extra) share the folder
# `onnxruntime/`: both are installed now and the files are a mix. Remove both, then put back the GPU build alone,
# at the version the resolver chose.
RUN --mount=type=cache,target=/root/.cache/uv \
    ort_gpu="$(python -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')" \
    && uv pip uninstall onnxruntime onnxruntime-gpu \
    && uv pip install --no-deps -c /opt/nyx/constraints.txt "onnxruntime-gpu==${ort_gpu}"

COPY docker/ /opt/nyx/docker/
RUN python /opt/nyx/docker/check-image.py --torch-cuda "${TORCH_CUDA}" \
    && nyx --version \
    && chmod 755 /opt/nyx/docker/*.sh \
    && install -m 644 /opt/nyx/docker/tmux.conf /etc/tmux.conf \
    && install -m 644 /opt/nyx/docker/profile-nyx.sh /etc/profile.d/zz-nyx.sh \
    && install -m 755 /opt/nyx/docker/nyx-wrapper.sh /usr/local/bin/nyx \
    && ln -sf /opt/nyx/docker/nyx-session.sh /usr/local/bin/nyx-session \
    && ln -sf /opt/nyx/docker/start.sh /start.sh

WORKDIR /workspace
EXPOSE 22
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
CMD ["/start.sh"]
