"""Images per second of the WD14 tagging loop: batched with decoding overlapped, against a batch-1 loop that
decodes each image inline (what a naive tagger does), on the same model and the same images.

    .venv/bin/python bench/tagging.py [--images 64] [--image-size 1024x768] [--batch 8] [--workers 2]
                                      [--model FOLDER_OR_REPO] [--repeat 2] [--threads 0]

Default model: a stand-in with the WD14 interface at the real input size (448x448x3 NHWC, dynamic batch,
sigmoid over a few thousand tags) and a conv stem of ~1.5 GFLOP per image, so inference costs something
without needing a download; `--model` takes a real tagger (a folder or a cached repo id). Images: JPEGs of
noise (they do not compress away) at `--image-size`, written once to a temporary folder. Both rows run
`wd14.tag_images` end to end (decode, preprocess, inference, postprocess, atomic caption writes in
overwrite mode); they differ only in `batch_size` and `decode_workers` (0: decode in the loop, no overlap).
The rows alternate `--repeat` times, each keeping its best. Nothing here is timed in tests.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

N_TAGS = 9000  # v3 taggers have ~10.8k outputs


def build_stand_in(folder: Path, size: int = 448) -> Path:
    """Conv 3→32→64→128→256 (3x3, stride 2 each), global pool, Gemm to N_TAGS, sigmoid; input NHWC."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", size, size, 3])
    y = helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", N_TAGS])
    nodes = [helper.make_node("Transpose", ["input_1"], ["h0"], perm=[0, 3, 1, 2])]
    inits = []
    channels = [3, 32, 64, 128, 256]
    for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9) / (255.0 if i == 0 else 1.0)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [f"h{i}", f"w{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"h{i + 1}"]))
    last = f"h{len(channels) - 1}"
    nodes += [
        helper.make_node("GlobalAveragePool", [last], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    inits.append(numpy_helper.from_array((rng.standard_normal((256, N_TAGS)) * 0.1).astype(np.float32), "head_w"))
    inits.append(numpy_helper.from_array(np.full(N_TAGS, -3.0, np.float32), "head_b"))
    graph = helper.make_graph(nodes, "wd14-bench", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count", "0,general,9,1", "1,sensitive,9,1", "2,questionable,9,1", "3,explicit,9,1"]
    rows += [f"{i},tag_{i},{4 if i % 50 == 0 else 0},1" for i in range(4, N_TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder


def make_images(folder: Path, n: int, width: int, height: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(np.roll(base, i * 7, axis=1)).save(path, quality=90)
        out.append(path)
    return out


def run(model: str, images: list[Path], batch: int, workers: int, threads: int) -> tuple[float, float, float]:
    """(images/s, seconds in inference, seconds the loop waited for decoded images) of one full pass."""
    from nyx_tui.tagging.wd14 import Tagger, TagOptions, tag_images

    tagger = Tagger.load(model, threads=threads)
    tagger.predict(np.full((1, tagger.size, tagger.size, 3), 255.0, np.float32))  # warm-up, not counted
    tagger.stats.infer_s = 0.0
    start = time.perf_counter()
    summary = tag_images(tagger, images, TagOptions(mode="overwrite", batch_size=batch), decode_workers=workers)
    elapsed = time.perf_counter() - start
    assert summary.failed == 0 and summary.conflicts == 0, summary.describe()
    return len(images) / elapsed, tagger.stats.infer_s, tagger.stats.decode_wait_s


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", default="1024x768", help="WIDTHxHEIGHT of the generated JPEGs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="decode threads of the overlapped loop")
    ap.add_argument("--model", help="a real tagger: folder or cached repo id (default: the 448 px stand-in)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = ap.parse_args()
    width, height = (int(v) for v in args.image_size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="nyx-bench-tag-") as tmp:
        ws = Path(tmp)
        model = args.model or str(build_stand_in(ws / "model"))
        images = make_images(ws / "images", args.images, width, height)
        print(
            f"{args.images} JPEGs {width}x{height}, model {args.model or 'stand-in 448 px conv stem'}, "
            f"{os.cpu_count()} CPUs; best of {args.repeat}"
        )
        rows = {
            "batch 1, decode inline": (1, 0),
            f"batch {args.batch}, {args.workers} decode threads": (args.batch, args.workers),
        }
        best: dict[str, tuple[float, float, float]] = {}
        for _ in range(args.repeat):
            for name, (batch, workers) in rows.items():
                result = run(model, images, batch, workers, args.threads)
                if name not in best or result[0] > best[name][0]:
                    best[name] = result
        print(f"{'':34}{'images/s':>10}{'infer s':>10}{'wait s':>10}")
        for name, (rate, infer, wait) in best.items():
            print(f"{name:34}{rate:10.2f}{infer:10.2f}{wait:10.2f}")
        base, ours = (best[name][0] for name in rows)
        print(f"ratio overlapped+batched / baseline: {ours / base:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
