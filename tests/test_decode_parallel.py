"""Images decoded on threads while the model runs: same shards, same errors, prompt clean-up.

The decode threads (``decode_workers``) only change when an image is decoded, never what is
embedded: shards are bitwise those of a serial decode, a bad image gives the same one-line error
naming it, and an interruption stops the decoding at once.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.data.folder import FolderDataset, write_folder_dataset
from conceptlens.concepts.embedding import decode
from conceptlens.concepts.embedding.decode import (
    MAX_DECODE_WORKERS,
    RangeDecoder,
    default_decode_workers,
    resolve_decode_workers,
)
from conceptlens.concepts.embedding.embed import embed, embed_ranges
from conceptlens.concepts.errors import DataError, StoreError
from conceptlens.concepts.models.adapters import ClassifierAdapter
from conceptlens.concepts.models.loading import LoadedModel
from torch import nn

from conceptlens.cli import main
from conceptlens.config import ConfigError, config_hash, parse_config
from conceptlens.limits import MAX_DECODE_WORKERS as CONFIG_MAX_DECODE_WORKERS

DECODE_THREAD = "conceptlens-decode"


def tiny_model(module: nn.Module | None = None) -> LoadedModel:
    torch.manual_seed(0)
    module = module or nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1)).eval()
    return LoadedModel(module, ClassifierAdapter((16, 16)), spec="test:tiny")


def random_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture
def png_folder(tmp_path):
    """Eleven PNG images (three batches of 4, the last one short) in the folder layout."""
    images = random_images(11)
    masks = [np.zeros((1, *image.shape[:2]), bool) for image in images]
    masks[0][0, 2:9, 3:12] = True
    return write_folder_dataset(ArrayDataset(images, masks, ["patch"]), tmp_path / "data")


def decode_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(DECODE_THREAD)]


class RecordingDataset(ArrayDataset):
    """Counts ``image`` calls and optionally waits or fails inside them (called from decode threads)."""

    def __init__(self, images, delay: float = 0.0, interrupt_at: int | None = None) -> None:
        super().__init__(images)
        self.delay, self.interrupt_at, self.calls = delay, interrupt_at, []
        self.lock = threading.Lock()

    def image(self, index):
        with self.lock:
            self.calls.append(index)
        if index == self.interrupt_at:
            raise KeyboardInterrupt
        time.sleep(self.delay)
        return super().image(index)


# --- the same shards ------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["native", "grid"])
def test_shards_bitwise_equal_with_and_without_decode_threads(png_folder, tmp_path, reduce):
    data = FolderDataset(png_folder)
    stores = {}
    for workers in (0, 2):
        result = embed(tiny_model(), data, ["0", "2"], tmp_path / f"store{workers}", reduce=reduce, grid=(6, 6), batch_size=4, decode_workers=workers)
        assert result.forward_batches == 3
        stores[workers] = result.entries
    for layer in ("0", "2"):
        serial, threaded = stores[0][layer], stores[2][layer]
        assert serial.key == threaded.key
        shards = [(s.start, s.end) for s in serial.shards()]
        assert shards == [(s.start, s.end) for s in threaded.shards()] == [(0, 4), (4, 8), (8, 11)]
        for a, b in zip(serial.shards(), threaded.shards()):
            assert a.path.read_bytes() == b.path.read_bytes()


def test_embed_ranges_with_threads_writes_the_serial_shards(png_folder, tmp_path):
    data = FolderDataset(png_folder)
    serial = embed(tiny_model(), data, ["2"], tmp_path / "serial", batch_size=4, decode_workers=0).entries["2"]
    assert embed_ranges(tiny_model(), data, ["2"], tmp_path / "threaded", [(8, 11), (0, 4), (4, 8)], decode_workers=3) == 3
    threaded = embed(tiny_model(), data, ["2"], tmp_path / "threaded", batch_size=4, decode_workers=0)
    assert threaded.forward_batches == 0  # every shard was there
    for a, b in zip(serial.shards(), threaded.entries["2"].shards()):
        assert (a.start, a.end) == (b.start, b.end) and a.path.read_bytes() == b.path.read_bytes()


def test_ranges_come_back_in_order_when_later_images_decode_first():
    class SlowFirst(ArrayDataset):
        def image(self, index):
            time.sleep(0.05 if index % 4 == 0 else 0.0)  # the first image of each range finishes last
            return super().image(index)

    images = random_images(10)
    with RangeDecoder(SlowFirst(images), [(4, 8), (0, 4), (8, 10)], workers=4) as decoded:
        got = list(decoded)
    assert [(start, end) for start, end, _ in got] == [(4, 8), (0, 4), (8, 10)]
    for start, end, batch in got:
        assert len(batch) == end - start and all(np.array_equal(a, images[i]) for a, i in zip(batch, range(start, end)))


# --- the decoding runs on threads, during the forward pass ------------------------------------------


def test_images_of_a_range_decode_concurrently():
    barrier = threading.Barrier(2, timeout=5)

    class Meeting(ArrayDataset):
        def image(self, index):
            barrier.wait()  # passes only when two images are being decoded at once
            return super().image(index)

    with RangeDecoder(Meeting(random_images(4)), [(0, 2), (2, 4)], workers=2) as decoded:
        assert [(start, end) for start, end, _ in decoded] == [(0, 2), (2, 4)]


def test_next_batch_is_decoded_while_the_model_runs():
    """The forward pass of batch 0 waits for an image of batch 1: only a decode ahead lets it finish."""
    decoded_ahead = threading.Event()
    waited = []

    class Signals(ArrayDataset):
        def image(self, index):
            if index == 5:
                decoded_ahead.set()
            return super().image(index)

    class WaitsForNextBatch(nn.Module):
        def forward(self, x):
            if not waited:
                waited.append(decoded_ahead.wait(timeout=10))
            return x

    module = nn.Sequential(WaitsForNextBatch(), nn.Conv2d(3, 2, 1)).eval()
    embed(tiny_model(module), Signals(random_images(8)), ["1"], None, batch_size=4, decode_workers=1)
    assert waited == [True]


# --- errors and interruption ----------------------------------------------------------------------


def _corrupt(folder, name: str) -> None:
    path = folder / "images" / f"{name}.png"
    path.write_bytes(path.read_bytes()[:200])  # the header is intact, the pixel data truncated


def test_bad_image_gives_the_serial_error_naming_it(png_folder, tmp_path):
    _corrupt(png_folder, "000005")
    _corrupt(png_folder, "000009")  # a later bad image must not be the one reported
    data = FolderDataset(png_folder)
    errors = {}
    for workers in (0, 3):
        with pytest.raises(DataError) as info:
            embed(tiny_model(), data, ["2"], tmp_path / f"store{workers}", batch_size=4, decode_workers=workers)
        errors[workers] = str(info.value)
        assert decode_threads() == []
    assert errors[3] == errors[0]
    assert "000005.png" in errors[3] and "truncated or corrupt" in errors[3]


def test_cli_bad_image_with_decode_threads_is_one_line_exit_2(png_folder, tmp_path, capsys):
    _corrupt(png_folder, "000002")
    argv = ["embed", "torchvision:resnet18", str(png_folder), "--layers", "layer1", "--store", str(tmp_path / "store"),
            "--input-size", "32", "32", "--batch-size", "4", "--decode-workers", "2", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "000002.png" in err[0] and "fix:" in err[0]


def test_interrupt_in_a_decode_thread_stops_the_run_without_decoding_on(tmp_path):
    images = random_images(400)
    data = RecordingDataset(images, delay=0.002, interrupt_at=6)
    with pytest.raises(KeyboardInterrupt):
        embed(tiny_model(), data, ["2"], tmp_path / "store", batch_size=4, decode_workers=2)
    assert decode_threads() == []
    seen = len(data.calls)
    assert seen <= 4 * 4  # the interrupted range and at most three ranges queued around it, not the 400 images
    time.sleep(0.1)
    assert len(data.calls) == seen  # nothing decodes after the run returned
    resumed = embed(tiny_model(), ArrayDataset(images), ["2"], tmp_path / "store", batch_size=4, decode_workers=0)
    assert resumed.forward_batches == 100 - 1  # the shard of range (0, 4) was kept, as with a serial decode


def test_interrupt_during_the_forward_pass_returns_promptly():
    class CtrlC(nn.Module):
        def forward(self, x):
            raise KeyboardInterrupt

    data = RecordingDataset(random_images(2000), delay=0.01)
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        embed(tiny_model(nn.Sequential(CtrlC(), nn.Conv2d(3, 2, 1))), data, ["1"], None, batch_size=8, decode_workers=4)
    assert time.perf_counter() - started < 5  # 2000 images × 10 ms would be 20 s of decoding
    assert decode_threads() == []
    assert len(data.calls) <= 8 * (decode.LOOKAHEAD + 1)


# --- the setting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, MAX_DECODE_WORKERS + 1, 1.5, "2", True])
def test_bad_decode_workers_is_refused(bad, tmp_path):
    with pytest.raises(StoreError) as info:
        embed(tiny_model(), ArrayDataset(random_images(2)), ["2"], tmp_path, decode_workers=bad)
    assert info.value.culprit == f"decode_workers={bad!r}" and "--decode-workers" in info.value.fix


@pytest.mark.parametrize(("cores", "expected"), [(1, 0), (2, 1), (3, 2), (16, 4)])
def test_default_leaves_a_core_to_the_model(monkeypatch, cores, expected):
    monkeypatch.setattr(decode.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_decode_workers() == expected
    assert resolve_decode_workers(None) == expected
    assert resolve_decode_workers(0) == 0


def test_config_key_bounds_match_the_library_and_do_not_change_the_hash():
    assert CONFIG_MAX_DECODE_WORKERS == MAX_DECODE_WORKERS
    base = {"name": "t", "data": {"spec": "synthetic:20:0"}, "models": [{"name": "m", "spec": "zoo:synthetic_vgg_centernet", "layers": ["backbone.block2"]}]}
    threaded = parse_config({**base, "embed": {"decode_workers": 3}}, "t.yaml")
    assert threaded.embed.decode_workers == 3 and parse_config(base, "t.yaml").embed.decode_workers is None
    assert config_hash(threaded) == config_hash(parse_config(base, "t.yaml"))
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "embed": {"decode_workers": -1}}, "t.yaml")
    assert info.value.culprit == "t.yaml: embed.decode_workers"


def test_cli_flag_reaches_embed(png_folder, tmp_path, monkeypatch, capsys):
    seen = []
    original = RangeDecoder.__init__

    def recording(self, dataset, ranges, workers):
        seen.append(workers)
        original(self, dataset, ranges, workers)

    monkeypatch.setattr(RangeDecoder, "__init__", recording)
    argv = ["embed", "torchvision:resnet18", str(png_folder), "--layers", "layer1", "--store", str(tmp_path / "store"),
            "--input-size", "32", "32", "--batch-size", "4", "--decode-workers", "3", "--quiet"]
    assert main(argv) == 0
    assert seen == [3]
    assert main([*argv[:-3], "--decode-workers", "-1", "--quiet"]) == 2
    assert "--decode-workers" in capsys.readouterr().err
