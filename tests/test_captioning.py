"""Captioning (BLIP, BLIP-2, Florence-2) as a job: `nyx caption DIR` end to end on tiny random-weight models
built here, offline. Random weights give meaningless but deterministic text (beam search), so the tests check
behaviour (every image captioned, prefix/suffix, the job's captions equal the in-process ones, modes, edits
never overwritten, clear errors), never particular words."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import run_nyx, wait_for
from PIL import Image

from nyx_tui.datasets.captions import caption_path, read_caption
from nyx_tui.jobs.control import ControlReader, send
from nyx_tui.jobs.events import EventWriter, read_events
from nyx_tui.jobs.jobdir import JobDir, create_job, list_jobs
from nyx_tui.tagging import captioners as c
from nyx_tui.tagging.caption_job import caption_images, load_image

PREFIX, SUFFIX = "mychar, ", ", photo"

# ------------------------------------------------------------------------------------------- tiny models


def _byte_vocab(specials: Sequence[str]) -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges: every byte is a token (GPT-2/BART tokenizers)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {s: i for i, s in enumerate(specials)}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    return vocab


def build_tiny_blip(out: Path) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    out.mkdir(parents=True, exist_ok=True)
    words = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "on", "with", "and", "small", "big", "tree"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words, *[f"w{i}" for i in range(40)]]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # NOTES.md: the constructor form silently ignores the vocab file in transformers 5
    tok = BertTokenizer.from_pretrained(str(out), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "bos_token_id": tok.bos_token_id,
            "sep_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_blip2(out: Path) -> Path:
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
    )

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(_byte_vocab(["<pad>", "</s>", "<unk>"])))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = GPT2Tokenizer.from_pretrained(str(out), bos_token="</s>", eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.image_token = "<image>"
    image_token = tok.convert_tokens_to_ids("<image>")
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok, num_query_tokens=4
    )
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Blip2Config(
        vision_config={**small, "image_size": 32, "patch_size": 8},
        qformer_config={**small, "vocab_size": 64, "encoder_hidden_size": 32, "max_position_embeddings": 64},
        text_config={
            "model_type": "opt",
            "vocab_size": len(tok),
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 128,
            "bos_token_id": 1,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
        num_query_tokens=4,
        image_token_index=image_token,
    )
    Blip2ForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_florence2(out: Path) -> Path:
    import torch
    from transformers import (
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(_byte_vocab(["<s>", "<pad>", "</s>", "<unk>"])))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = BartTokenizer.from_pretrained(str(out), extra_special_tokens={"image_token": "<image>"})
    # a 64 px image through DaViT's 32x downsampling: 2x2 tokens plus the pooled one
    image_processor = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tok)
    torch.manual_seed(0)
    config = Florence2Config(
        vision_config={
            "depths": [1, 1, 1, 1],
            "embed_dim": [8, 16, 32, 64],
            "num_heads": [1, 1, 2, 2],
            "num_groups": [1, 1, 2, 2],
            "window_size": 2,
            "projection_dim": 32,
            "max_position_embeddings": 16,
            "max_temporal_embeddings": 4,
        },
        text_config={
            "model_type": "bart",
            "vocab_size": len(tok),
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 128,
            "bos_token_id": 0,
            "pad_token_id": 1,
            "eos_token_id": 2,
            "decoder_start_token_id": 2,
        },
        image_token_id=tok.image_token_id,
    )
    Florence2ForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("blip"))


def make_images(folder: Path, n: int = 5) -> list[Path]:
    """Distinct small images (plus one with transparency in a sub-folder), in iter_images order."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (24 + 4 * i, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (folder / "sub").mkdir(exist_ok=True)
    alpha = folder / "sub" / "alpha.png"
    Image.new("RGBA", (20, 20), (10, 200, 30, 0)).save(alpha)
    return [*paths, alpha]


def settings_for(folder: Path, model: Path | str, **kw: Any) -> c.CaptionSettings:
    return c.CaptionSettings(folder=str(folder), model=str(model), **kw)


class FakeCaptioner:
    """Captions "caption N" (a running count), and runs `during` in the middle of each batch: a stand-in that
    lets a test change files while 'the model runs'."""

    kind = "fake"
    device = "cpu"

    def __init__(self, during: Any = None) -> None:
        self.n = 0
        self.during = during
        self.batches: list[int] = []

    def caption(self, images: Sequence[Any]) -> list[str]:
        self.batches.append(len(images))
        if self.during is not None:
            self.during()
        out = []
        for _ in images:
            self.n += 1
            out.append(f"caption {self.n}")
        return out


def _events(tmp_path: Path) -> EventWriter:
    return EventWriter(tmp_path / "events.jsonl")


# ------------------------------------------------------------------------------------------- the job, end to end


def test_caption_job_writes_what_the_captioner_says(blip_dir: Path, nyx_home: Path, tmp_path: Path) -> None:
    images = make_images(tmp_path / "data")
    (tmp_path / "data" / "broken.jpg").write_bytes(b"not an image")
    proc = run_nyx(
        "caption", str(tmp_path / "data"), "--model", str(blip_dir), "--prefix", PREFIX, "--suffix", SUFFIX,
        "--batch-size", "2", "--beams", "3", home=nyx_home, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FINISHED" in proc.stdout
    [job] = list_jobs(nyx_home / "jobs")
    assert job.spec()["kind"] == "caption" and job.status()["state"] == "finished"
    events = job.events()
    start = next(e for e in events if e["kind"] == "start")
    assert start["job_kind"] == "caption" and start["total"] == len(images) + 1
    progress = [e for e in events if e["kind"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == len(images) + 1
    assert all(e["unit"] == "images" for e in progress)
    warnings = [e["message"] for e in events if e["kind"] == "log" and e["level"] == "warning"]
    assert any("broken.jpg" in m for m in warnings)

    written = {p: read_caption(caption_path(p))[0] for p in images}
    for text in written.values():
        assert text.startswith(PREFIX) and text.endswith(SUFFIX) and len(text) > len(PREFIX + SUFFIX)
    assert not caption_path(tmp_path / "data" / "broken.jpg").exists()

    # the same captions in-process, same settings and batches (beam search is deterministic)
    captioner = c.load_captioner(settings_for(tmp_path / "data", blip_dir, batch_size=2))
    assert captioner.kind == "blip"
    readable = [load_image(p) for p in images]
    expected = [t for i in range(0, len(readable), 2) for t in captioner.caption(readable[i : i + 2])]
    assert [written[p] for p in images] == [c.finish_caption(t, PREFIX, SUFFIX) for t in expected]


def test_detached_append_keeps_existing_captions(blip_dir: Path, nyx_home: Path, tmp_path: Path) -> None:
    images = make_images(tmp_path / "data", n=2)
    caption_path(images[0]).write_text("mychar, old tags")
    proc = run_nyx(
        "caption", str(tmp_path / "data"), "--model", str(blip_dir), "--mode", "append", "--prefix", PREFIX,
        "--prompt", "a photo of", "--detach", home=nyx_home, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = JobDir(nyx_home / "jobs" / proc.stdout.strip())
    wait_for(lambda: job.effective_state() in ("finished", "failed"), timeout=90)
    assert job.status()["state"] == "finished", (job.path / "output.log").read_text()[-3000:]
    first = read_caption(caption_path(images[0]))[0]
    assert first.startswith("mychar, old tags, ") and first.count("mychar") == 1  # the prefix is not repeated
    assert first.removeprefix("mychar, old tags, ").startswith("a photo of")  # BLIP continues its prompt
    assert read_caption(caption_path(images[1]))[0].startswith(PREFIX + "a photo of")


# ------------------------------------------------------------------------------------------- modes and edits


def test_modes(tmp_path: Path) -> None:
    images = make_images(tmp_path / "data", n=3)[:3]
    caption_path(images[0]).write_text("old, tags")
    caption_path(images[1]).write_text("  \n")  # blank counts as no caption

    def run(mode: str) -> tuple[list[str], Any]:
        summary = caption_images(images, FakeCaptioner(), settings_for(tmp_path, "x", mode=mode), _events(tmp_path))
        return [read_caption(caption_path(p))[0] for p in images], summary

    texts, summary = run("skip")
    assert texts == ["old, tags", "caption 1", "caption 2"] and summary.skipped == 1 and summary.captioned == 2
    texts, _ = run("append")
    assert texts == ["old, tags, caption 1", "caption 1, caption 2", "caption 2, caption 3"]
    texts, summary = run("overwrite")
    assert texts == ["caption 1", "caption 2", "caption 3"] and summary.captioned == 3


def test_edit_during_generation_is_never_overwritten(tmp_path: Path) -> None:
    images = make_images(tmp_path / "data", n=3)[:3]
    edited = caption_path(images[1])
    edited.write_text("before")

    def user_edits() -> None:
        edited.write_text("my careful edit")

    summary = caption_images(
        images, FakeCaptioner(during=user_edits), settings_for(tmp_path, "x", batch_size=4), _events(tmp_path)
    )
    assert edited.read_text() == "my careful edit"
    assert read_caption(caption_path(images[0]))[0] == "caption 1"
    assert read_caption(caption_path(images[2]))[0] == "caption 3"
    assert summary.conflicts == 1 and summary.captioned == 2
    logs = [e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "log"]
    assert any(e["level"] == "warning" and str(edited) in e["message"] for e in logs)


def test_stop_between_batches(tmp_path: Path) -> None:
    images = make_images(tmp_path / "data", n=4)
    control = tmp_path / "control.jsonl"
    fake = FakeCaptioner(during=lambda: send(control, "stop"))
    summary = caption_images(
        images, fake, settings_for(tmp_path, "x", batch_size=2), _events(tmp_path), ControlReader(control)
    )
    assert summary.stopped == "stop" and fake.batches == [2] and summary.captioned == 2
    assert not caption_path(images[2]).exists()
    acks = [e for e in read_events(tmp_path / "events.jsonl") if e.get("ack") == "stop"]
    assert len(acks) == 1


def test_progress_is_throttled(tmp_path: Path) -> None:
    images = make_images(tmp_path / "data", n=5)[:5] * 40  # 200 images, one a batch, written in a blink
    caption_images(images, FakeCaptioner(), settings_for(tmp_path, "x", batch_size=1), _events(tmp_path))
    progress = [e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "progress"]
    assert progress[-1]["done"] == 200 and len(progress) < 30


def test_load_image_flattens_alpha_on_white(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_merge_and_settings() -> None:
    assert c.merge_caption("", "new", "append") == "new"
    assert c.merge_caption("a, b,", "new", "append") == "a, b, new"
    assert c.merge_caption("x", "new", "skip") is None
    assert c.merge_caption("x", "new", "overwrite") == "new"
    s = c.CaptionSettings(folder="/d", model="o/n", generation=c.GenerationSettings(sample=True, top_p=0.5))
    assert c.CaptionSettings.from_dict({**s.to_dict(), "future_option": 1}) == s
    kw = s.generation.generate_kwargs()
    assert kw["do_sample"] and kw["top_p"] == 0.5 and kw["num_beams"] == 1
    assert c.GenerationSettings().generate_kwargs()["num_beams"] == 3
    assert c.GenerationSettings(min_new_tokens=9, max_new_tokens=4).problems()


# ------------------------------------------------------------------------------------------- errors


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """An empty Hugging Face cache, offline: what a fresh box without the model looks like."""
    hf = tmp_path / "hf-empty"
    hf.mkdir(exist_ok=True)
    return {"HF_HOME": str(hf), "HF_HUB_OFFLINE": "1"}


def test_missing_repo_id_names_the_download(nyx_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path / "data", n=1)
    repo = "nobody/no-such-captioner"
    for key, value in _offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)  # run_nyx passes this process's environment on
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    proc = run_nyx("caption", str(tmp_path / "data"), "--model", repo, home=nyx_home, timeout=60)
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert f"hf download {repo}" in err and "not in the local Hugging Face cache" in err
    assert not list_jobs(nyx_home / "jobs")  # nothing was started

    # the worker says the same when the cache lost the model after the job was made
    settings = settings_for(tmp_path / "data", repo)
    job = create_job("caption", "c", [], extra={"caption": settings.to_dict()}, root=tmp_path / "jobs")
    worker = subprocess.run(
        [sys.executable, "-m", "nyx_tui.tagging.caption_job", str(job.path)],
        env=dict(os.environ), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert worker.returncode == 1 and f"hf download {repo}" in worker.stderr
    assert any(e["kind"] == "log" and e["level"] == "error" for e in job.events())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{missing}", "--model", "{model}"], "is not a folder"),
        (["{empty}", "--model", "{model}"], "has no images"),
        (["{data}", "--model", "not a model"], "neither an existing folder nor a Hugging Face repo id"),
        (["{data}", "--model", "{empty}"], "no config.json"),
        (["{data}", "--model", "{model}", "--kind", "blip2"], "--kind blip2 does not match"),
        (["{data}", "--model", "{model}", "--beams", "0"], "--beams must be at least 1"),
        (["{data}", "--model", "{model}", "--min-tokens", "50"], "--min-tokens"),
        (["{data}", "--model", "{model}", "--caption-ext", ".png"], "--caption-ext"),
        (["{data}", "--model", "{model}", "--batch-size", "0"], "--batch-size"),
        (["{data}", "--model", "{model}", "--beams", "2", "--sample"], "not allowed with"),
    ],
)
def test_bad_input_exits_2(
    args: list[str], needle: str, blip_dir: Path, nyx_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nyx_tui.cli import main

    make_images(tmp_path / "data", n=1)
    (tmp_path / "empty").mkdir()
    where = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "data": tmp_path / "data", "model": blip_dir}
    argv = ["caption", *(a.format(**where) for a in args)]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = int(e.code or 0)
    assert rc == 2
    err = " ".join(capsys.readouterr().err.split())
    assert needle in err
    assert not list_jobs(nyx_home / "jobs")


def test_bad_input_via_subprocess(nyx_home: Path, tmp_path: Path) -> None:
    proc = run_nyx("caption", str(tmp_path / "nope"), "--model", "a/b", home=nyx_home, timeout=60)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and "nothing was started" in proc.stderr


def test_original_florence_needs_trust_remote_code(tmp_path: Path) -> None:
    folder = tmp_path / "florence-original"
    folder.mkdir()
    config = {"model_type": "florence2", "auto_map": {"AutoModelForCausalLM": "modeling_florence2.X"},
              "vision_config": {"model_type": "davit"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(c.CaptionModelError, match="trust-remote-code"):
        c.load_captioner(settings_for(tmp_path, folder))
    from nyx_tui.tagging.caption_cli import problems

    make_images(tmp_path / "data", n=1)
    assert any("--trust-remote-code" in p for p in problems(settings_for(tmp_path / "data", folder)))


# ------------------------------------------------------------------------------------------- BLIP-2, Florence-2


def test_blip2_tiny(tmp_path: Path) -> None:
    folder = build_tiny_blip2(tmp_path / "blip2")
    assert c.detect_kind(folder) == "blip2"
    imgs = [load_image(p) for p in make_images(tmp_path / "data", n=2)]
    gen = c.GenerationSettings(max_new_tokens=6, min_new_tokens=2)
    captioner = c.load_captioner(settings_for(tmp_path, folder, generation=gen))
    first = captioner.caption(imgs)
    assert len(first) == len(imgs) and all(isinstance(t, str) for t in first)
    assert captioner.caption(imgs) == first  # beam search: deterministic
    asked = c.load_captioner(settings_for(tmp_path, folder, generation=gen, prompt="Question: what? Answer:"))
    assert all(not t.startswith("Question") for t in asked.caption(imgs))  # the answer, not the question


def test_florence2_tiny(tmp_path: Path) -> None:
    folder = build_tiny_florence2(tmp_path / "florence2")
    assert c.detect_kind(folder) == "florence2"
    imgs = [load_image(p) for p in make_images(tmp_path / "data", n=2)]
    gen = c.GenerationSettings(max_new_tokens=6, min_new_tokens=2)
    captioner = c.load_captioner(settings_for(tmp_path, folder, generation=gen))
    assert captioner.prompt == c.FLORENCE_DEFAULT_TASK
    out = captioner.caption(imgs)
    assert len(out) == len(imgs) and captioner.caption(imgs) == out
    assert c.load_captioner(settings_for(tmp_path, folder, generation=gen, prompt="<CAPTION>")).caption(imgs)
    with pytest.raises(c.CaptionModelError, match="task token"):
        c.load_captioner(settings_for(tmp_path, folder, prompt="describe it"))
