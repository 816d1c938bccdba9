"""Download throughput: the engine (`nyx_tui.downloads.engine`) against `curl` on the same bytes, same run.

A local server (tests/dl_faults.py, in its own process so it does not share the engine's GIL) serves
deterministic pattern files that are never stored: one big file (default 1 GiB) and N smaller ones
(default 8 × 128 MiB). Each round downloads them into a temporary folder with each tool in turn
(alternating, so a noisy neighbour hurts both alike); the best round of each is reported.

  (a) one file:   engine `fetch` (sha256 verified, fsync, atomic rename — its real work) vs `curl -s -o`
  (b) N files:    engine `fetch_all(concurrency=N)` vs `curl --parallel --parallel-max N`

Goal: the engine at ≥ 0.9× curl. Numbers are for a loopback link, so they measure per-byte CPU cost
(parsing, hashing, writing), which is what decides whether the engine keeps up with a fast datacenter link.

    .venv/bin/python bench/download.py [--size MIB] [--files N] [--file-size MIB] [--rounds R]
    .venv/bin/python bench/download.py --size 128 --file-size 16 --rounds 2     # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nyx_tui.downloads.engine import fetch, fetch_all  # noqa: E402
from nyx_tui.downloads.model import RemoteFile  # noqa: E402

MIB = 1 << 20


def start_server(files: dict[str, int]) -> tuple[subprocess.Popen[str], int, dict[str, str]]:
    """The fault server in a child process; returns it, its port and each path's sha256."""
    argv = [sys.executable, str(ROOT / "tests" / "dl_faults.py"), *(f"{p}={n}" for p, n in files.items())]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline().split()[1])
    shas: dict[str, str] = json.loads(proc.stdout.readline())
    return proc, port, shas


def clear(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            p.unlink()


def engine_one(url: str, name: str, sha: str, size: int, dest: Path) -> float:
    t = time.perf_counter()
    path = asyncio.run(fetch(RemoteFile(url, name, size=size, sha256=sha), dest, min_free_bytes=0))
    dt = time.perf_counter() - t
    assert path.stat().st_size == size
    return dt


def curl_one(url: str, name: str, size: int, dest: Path) -> float:
    out = dest / name
    t = time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
    dt = time.perf_counter() - t
    assert out.stat().st_size == size
    return dt


def curl_verified_one(url: str, name: str, sha: str, size: int, dest: Path) -> float:
    """curl, then the work the engine also does: sha256 of the file and fsync (the same-work baseline)."""
    out = dest / name
    t = time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    assert h.hexdigest() == sha
    return dt


def engine_many(files: list[RemoteFile], dest: Path) -> float:
    t = time.perf_counter()
    asyncio.run(fetch_all(files, dest, concurrency=len(files), min_free_bytes=0))
    return time.perf_counter() - t


def curl_many(urls: list[str], names: list[str], dest: Path) -> float:
    argv = ["curl", "-s", "-f", "--no-progress-meter", "--parallel", "--parallel-max", str(len(urls))]
    for u, n in zip(urls, names, strict=True):
        argv += ["-o", str(dest / n), u]
    t = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="the single file, MiB (default 1024)")
    ap.add_argument("--files", type=int, default=8, help="how many concurrent files (default 8)")
    ap.add_argument("--file-size", type=int, default=128, help="each concurrent file, MiB (default 128)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per tool; best is reported (default 3)")
    args = ap.parse_args()
    if shutil.which("curl") is None:
        print("curl not found: no baseline", file=sys.stderr)
        return 2

    big = args.size * MIB
    small = args.file_size * MIB
    layout = {"/big.bin": big, **{f"/f{i}.bin": small for i in range(args.files)}}
    proc, port, shas = start_server(layout)
    base = f"http://127.0.0.1:{port}"
    print(f"cpu cores: {os.cpu_count()} (shared machine: figures are indicative); loopback server in its own process")
    try:
        with tempfile.TemporaryDirectory(prefix="nyx-dl-bench-") as tmp:
            dest = Path(tmp)
            eng, crl, crv = [], [], []
            for _ in range(args.rounds):
                eng.append(engine_one(f"{base}/big.bin", "big.bin", shas["/big.bin"], big, dest))
                clear(dest)
                crl.append(curl_one(f"{base}/big.bin", "big.bin", big, dest))
                clear(dest)
                crv.append(curl_verified_one(f"{base}/big.bin", "big.bin", shas["/big.bin"], big, dest))
                clear(dest)
            e_mbs, c_mbs, v_mbs = (big / MIB / min(x) for x in (eng, crl, crv))

            def runs(ts: list[float]) -> str:
                return ", ".join(f"{big / MIB / t:.0f}" for t in ts)

            print(f"(a) one file, {args.size} MiB, best of {args.rounds}:")
            print(f"    engine          {e_mbs:6.0f} MiB/s  (runs: {runs(eng)})  [sha256 + fsync + rename]")
            print(f"    curl -s -o      {c_mbs:6.0f} MiB/s  (runs: {runs(crl)})")
            print(f"    curl + verify   {v_mbs:6.0f} MiB/s  (runs: {runs(crv)})  [then sha256 + fsync: same work]")
            print(f"    ratio vs curl   {e_mbs / c_mbs:6.2f}x  (goal >= 0.9x);  vs curl + verify {e_mbs / v_mbs:.2f}x")

            names = [f"f{i}.bin" for i in range(args.files)]
            urls = [f"{base}/{n}" for n in names]
            files = [RemoteFile(u, n, size=small, sha256=shas[f"/{n}"]) for u, n in zip(urls, names, strict=True)]
            eng, crl = [], []
            for _ in range(args.rounds):
                eng.append(engine_many(files, dest))
                clear(dest)
                crl.append(curl_many(urls, names, dest))
                clear(dest)
            total = small * args.files / MIB
            e_mbs, c_mbs = total / min(eng), total / min(crl)
            print(f"(b) {args.files} files x {args.file_size} MiB at once, best of {args.rounds}:")
            print(f"    engine {e_mbs:8.0f} MiB/s total")
            print(f"    curl   {c_mbs:8.0f} MiB/s total (--parallel)")
            print(f"    ratio  {e_mbs / c_mbs:8.2f}x")
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
