"""The Docker build's last check: the image holds the GPU builds it was meant to, or the build fails.

A wrong wheel does not fail at install time: a CPU torch, or onnxruntime and onnxruntime-gpu both installed
(they write the same `onnxruntime/` folder, and whichever went last wins), only shows on the rented box.
`onnxruntime.get_available_providers()` lists the providers the build has, GPU or not, so the check runs on a
build machine without one. Usage: python check-image.py --torch-cuda cu130
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import sys


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def problems(torch_cuda: str) -> tuple[list[str], list[str]]:
    """(problems, facts): each problem names what is wrong and the fix."""
    found: list[str] = []
    facts: list[str] = []
    if _version("onnxruntime") is not None:
        found.append(
            "the CPU onnxruntime is installed: it overwrites onnxruntime-gpu's files. "
            "Fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install --no-deps onnxruntime-gpu==VERSION"
        )
    gpu_ort = _version("onnxruntime-gpu")
    if gpu_ort is None:
        found.append("onnxruntime-gpu is not installed: install Nyx with its GPU extra, .[gpu]")
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except Exception as e:  # a half-overwritten onnxruntime folder fails here
        found.append(f"onnxruntime does not import ({type(e).__name__}: {e}): reinstall onnxruntime-gpu alone")
    else:
        facts.append(f"onnxruntime-gpu {gpu_ort}: {', '.join(providers)}")
        if "CUDAExecutionProvider" not in providers:
            found.append(f"onnxruntime has no CUDAExecutionProvider (only {', '.join(providers)}): a CPU build")
    import torch

    want = torch_cuda.removeprefix("cu")
    have = torch.version.cuda
    facts.append(f"torch {torch.__version__} (CUDA {have})")
    if have is None:
        found.append(f"torch {torch.__version__} is a CPU build: install it from the {torch_cuda} index")
    elif have.replace(".", "") != want:
        found.append(f"torch is built for CUDA {have}, the image asked for {torch_cuda}")
    return found, facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-cuda", required=True, help="the torch build the image installs, e.g. cu130")
    args = parser.parse_args(argv)
    found, facts = problems(args.torch_cuda)
    for fact in facts:
        print(f"image check: {fact}")
    for problem in found:
        print(f"image check FAILED: {problem}", file=sys.stderr)
    if not found:
        print("image check: ok")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
