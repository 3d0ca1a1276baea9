"""The streaming back-end: shards written atomically with a checksummed manifest, the torchvision back-end's pixels,
every sample once per epoch across ranks, resume by skipping batches, a bounded remote cache, one-line errors."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules import shards
from datamodules.base import BatchTransform, ImageDataModule
from datamodules.streaming_loader import ShardBatches, StreamingLoader, epoch_order, rank_range, serving_order
from datamodules.torchvision_loader import TorchvisionLoader
from modules.components.errors import DataError
from tests.conftest import CONFIGS, ROOT, cli_args, one_line_error

SETTINGS = dict(image_size=16, batch_size=4, num_workers=2, rrc_scale=(0.5, 1.0), val_crop_ratio=0.9, val_fraction=0.25)


class WithIndex(BatchTransform):
    """Batches that keep each sample's ``index`` (what the caption and replay transforms ask the loaders for)."""

    yields_index = True

    def __call__(self, datamodule, batch, training):
        return datamodule.prepare_batch(batch)


def streaming(source, num_workers: int = 2, **loader) -> ImageDataModule:
    return ImageDataModule(source=str(source), loader=StreamingLoader(**loader), batches=WithIndex(),
                           **{**SETTINGS, "num_workers": num_workers})


@pytest.fixture(scope="module")
def shard_set(image_folder, tmp_path_factory):
    """The 3-class folder written by ``visionlab prepare-data --format webdataset`` in ~1.5 KB shards (many per split)."""
    from app.prepare_data import main

    out = tmp_path_factory.mktemp("shards") / "set"
    main(["--config", str(CONFIGS / "data/imagefolder_streaming.yaml"), "--data.init_args.source", str(image_folder),
          "--data.init_args.val_fraction", "0.25", "--data.init_args.loader.init_args.shard_bytes", "1500",
          "--format", "webdataset", "--output", str(out), "--workers", "2"])
    return out


def test_prepare_data_writes_checksummed_shards_any_webdataset_reader_reads(shard_set, image_folder):
    import webdataset as wds

    manifest = json.loads((shard_set / shards.MANIFEST).read_text())
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["samples"], val["samples"]) == (36, 12) and len(train["shards"]) > 2
    for entry in (*train["shards"], *val["shards"]):
        assert shards.file_sha256(shard_set / entry["file"]) == entry["sha256"]
    # training shards hold a seeded permutation (class folders are listed class by class), validation the source order
    members = shards.shard_indices(train)
    assert sorted(np.concatenate(members).tolist()) == list(range(36))
    assert np.concatenate(members).tolist() != list(range(36))
    assert np.concatenate(shards.shard_indices(val)).tolist() == list(range(12))
    source = ImageDataModule(source=str(image_folder), loader=TorchvisionLoader(), **SETTINGS).get_source("train")
    samples = list(wds.WebDataset([str(shard_set / e["file"]) for e in train["shards"]], shardshuffle=False,
                                  empty_check=False))
    assert len(samples) == 36
    for sample in samples:  # the source file's own bytes and label, under the sample's index
        index = int(sample["__key__"])
        image = next(value for key, value in sample.items() if key in {"jpg", "png"})
        assert image == Path(source.files[index]).read_bytes()
        assert int(sample["cls"]) == source.labels[index]


def test_a_captions_file_goes_into_the_shards(image_folder, tmp_path):
    """Each sample carries its captions as WebDataset's ``.txt`` (open_clip's layout); batches keep the index lookup."""
    import webdataset as wds

    from datamodules.captions import CaptionsFile

    files = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*"))
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{name}\tcaption {i}\n{name}\tanother {i}\n" for i, name in enumerate(files)))
    dm = ImageDataModule(source=str(image_folder), loader=StreamingLoader(cache_dir=str(tmp_path / "cache"),
                                                                          shard_bytes=20000, write_workers=1),
                         batches=CaptionsFile(str(captions)), **SETTINGS)
    manifest = dm.loader.write_shards(tmp_path / "set")
    source = dm.get_source("val")
    entries = manifest["splits"]["val"]["shards"]
    for sample in wds.WebDataset([str(tmp_path / "set" / e["file"]) for e in entries], shardshuffle=False, empty_check=False):
        i = files.index(Path(source.files[int(sample["__key__"])]).relative_to(image_folder).as_posix())
        assert sample["txt"].decode() == f"caption {i}\nanother {i}"


def test_a_failed_write_leaves_nothing(image_folder, tmp_path):
    broken = tmp_path / "broken"
    for folder in image_folder.iterdir():
        (broken / folder.name).mkdir(parents=True)
        for file in sorted(folder.iterdir())[:4]:
            (broken / folder.name / file.name).write_bytes(file.read_bytes())
    bad = next((broken / next(iter(sorted(p.name for p in image_folder.iterdir())))).iterdir())
    bad.write_bytes(b"not an image")
    dm = streaming(broken, cache_dir=str(tmp_path / "cache"), shard_bytes=1500)
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        dm.loader.write_shards(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_eval_batches_are_the_torchvision_back_ends(shard_set, image_folder):
    """Same decoder, same centre crop: the validation batches equal the torchvision back-end's (index order), the
    2 workers serving blocks [0, 1] and [2] interleaved."""
    ours = streaming(image_folder, remote=str(shard_set), cache_dir=str(shard_set.parent / "cache"))
    theirs = ImageDataModule(source=str(image_folder), loader=TorchvisionLoader(), batches=WithIndex(), **SETTINGS)
    ours.setup("fit"), theirs.setup("fit")
    served, reference = list(ours.val_dataloader()), list(theirs.val_dataloader())
    assert len(served) == 3 and serving_order([0, 1, 2], 2) == [0, 2, 1]
    assert all(_same(mine, reference[b]) for mine, b in zip(served, [0, 2, 1], strict=True))


def test_epoch_order_is_every_sample_once_and_rank_shares_cover_it():
    members = [np.arange(0, 5), np.arange(5, 7), np.arange(7, 12)]
    shard_of, index = epoch_order(members, seed=3, epoch=1, shuffle=True)
    assert sorted(index.tolist()) == list(range(12))
    assert all(index[i] in members[shard_of[i]] for i in range(12))
    # a shard's samples are consecutive (read once, as a unit), and the epoch changes the order
    assert len(np.flatnonzero(np.diff(shard_of))) == 2
    assert not np.array_equal(index, epoch_order(members, seed=3, epoch=2, shuffle=True)[1])
    assert [rank_range(11, r, 3, equal=True) for r in range(3)] == [(0, 3), (3, 6), (6, 9)]
    assert [rank_range(11, r, 3, equal=False) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]


def _epoch(batches: ShardBatches, epoch: int, skip: int = 0, workers: int = 2) -> list:
    batches.epoch, batches.trained = epoch, [[0, skip]] if skip else []
    return list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                            multiprocessing_context="fork" if workers else None))


def _same(batch, other) -> bool:
    return all(torch.equal(a, b) for a, b in zip(batch, other, strict=True))


def test_ranks_read_every_sample_once_and_a_resumed_epoch_skips_whole_batches(shard_set, image_folder):
    dm = streaming(image_folder, remote=str(shard_set), cache_dir=str(shard_set.parent / "cache"))
    dm.setup("fit")
    entry, transform = dm.loader.manifest()["splits"]["train"], dm.loader.transform("train", True)
    ranks = [ShardBatches(dm.loader.store(), entry, transform, 4, True, rank, 2, dm.seed, dm.augment.seed, True)
             for rank in range(2)]
    epochs = [[_epoch(rank, epoch) for rank in ranks] for epoch in (0, 1)]
    for per_rank in epochs:  # 36 samples, 2 ranks of 18, batches of 4: 4 batches (16 samples) per rank
        seen = [torch.cat([batch[2] for batch in batches]).tolist() for batches in per_rank]
        assert [len(s) for s in seen] == [16, 16] and not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) <= set(range(36))
    assert not torch.equal(epochs[0][0][0][2], epochs[1][0][0][2])  # each epoch its own order
    # 2 workers serve blocks [0, 1] and [2, 3] interleaved; the batches are the in-process (rank order) ones
    in_order = _epoch(ranks[1], 1, workers=0)
    assert all(_same(a, in_order[b]) for a, b in zip(epochs[1][1], [0, 2, 1, 3], strict=True))
    # resumed 3 batches into epoch 1 on rank 1, with another worker count: the remaining batch, pixel for pixel
    resumed = _epoch(ranks[1], 1, skip=3, workers=1)
    assert len(resumed) == 1 and _same(resumed[0], in_order[3])
    # the loader keeps its whole epoch's length for Lightning, and the source labels come with each index
    assert len(ranks[0]) == 4
    labels = dm.get_source("train").labels
    assert all((batch[1].numpy() == labels[batch[2].numpy()]).all() for batch in epochs[0][0])


def test_remote_cache_stays_under_its_limit_while_a_larger_set_trains(shard_set, image_folder, tmp_path):
    manifest = json.loads((shard_set / shards.MANIFEST).read_text())
    sizes = [entry["bytes"] for entry in manifest["splits"]["train"]["shards"]]
    limit = 3 * max(sizes)
    assert sum(sizes) > 2 * limit  # the training shards do not fit
    dm = streaming(image_folder, remote=f"file://{shard_set}", cache_dir=str(tmp_path / "cache"), cache_limit=limit)
    dm.setup("fit")
    store, seen = dm.loader.store(), []
    for epoch in range(2):
        for batch in dm.train_dataloader():
            assert store.cache_bytes() <= limit
            seen += batch[2].tolist()
    assert len(seen) == 2 * 36 // 4 * 4 and len(set(seen[:36])) == 36
    assert 0 < store.cache_bytes() <= limit


def test_the_cache_is_counted_while_no_worker_evicts(shard_set, image_folder, tmp_path):
    """The count waits for a fetch in progress (which evicts): listing a file a worker deletes before its stat
    failed the test above about once in ten runs with FileNotFoundError."""
    import fcntl
    import threading

    dm = streaming(image_folder, remote=f"file://{shard_set}", cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    store = dm.loader.store()
    shard = json.loads((shard_set / shards.MANIFEST).read_text())["splits"]["train"]["shards"][0]
    store.local_path(shard)
    counted = []
    with open(store.cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what a fetching worker holds while it evicts and copies
        counter = threading.Thread(target=lambda: counted.append(store.cache_bytes()))
        counter.start()
        counter.join(0.5)
        assert counted == []  # still waiting for the lock
    counter.join(10)
    assert counted == [shard["bytes"]]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_shard_fails_naming_it(shard_set, image_folder, tmp_path, damage):
    remote = tmp_path / "remote"
    remote.mkdir()
    for file in shard_set.iterdir():
        (remote / file.name).write_bytes(file.read_bytes())
    victim = remote / json.loads((remote / shards.MANIFEST).read_text())["splits"]["train"]["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    else:
        victim.unlink()
    dm = streaming(image_folder, remote=str(remote), cache_dir=str(tmp_path / "cache"), retries=1, retry_wait=0)
    dm.setup("fit")
    expected = {"flip": "is corrupt", "truncate": "truncated or corrupt", "delete": "is missing"}[damage]
    with pytest.raises(DataError, match=f"{victim.name}.*{expected}|{expected}.*{victim.name}"):
        for _ in dm.train_dataloader():
            pass
    assert not list((tmp_path / "cache").rglob(victim.name))  # never kept in the cache


def test_unreachable_store_is_one_line_exit_2(run_cli, tmp_path, capsys):
    code = run_cli(cli_args(tmp_path, tmp_path / "cache", "--data.init_args.loader.init_args.remote",
                            "http://127.0.0.1:9/shards", "--data.init_args.loader.init_args.retries", "1",
                            "--data.init_args.loader.init_args.retry_wait", "0", data="data/fashion_mnist_streaming.yaml"))
    assert code == 2
    one_line_error(capsys, "http://127.0.0.1:9/shards/manifest.json", "after 2 tries", "reachable")


@pytest.mark.slow
def test_a_corrupt_shard_stops_fit_with_one_line(run_cli, tmp_path, capsys):
    """Written on first use into the cache, then damaged in place: the run names the shard (a worker found it)."""
    cache = tmp_path / "cache"
    extra = ("--data.init_args.train_limit", "64", "--data.init_args.val_limit", "16",
             "--data.init_args.loader.init_args.shard_bytes", "20000", "--trainer.fast_dev_run", "true")
    assert run_cli(cli_args(tmp_path / "ok", cache, *extra, data="data/fashion_mnist_streaming.yaml")) == 0
    victim = sorted(cache.rglob("train-*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    code = run_cli(cli_args(tmp_path / "bad", cache, *extra, data="data/fashion_mnist_streaming.yaml"))
    assert code == 2
    one_line_error(capsys, str(victim), "corrupt")


@pytest.mark.slow
def test_two_gloo_ranks_see_every_sample_once_and_resume_with_the_unseen(tmp_path, image_folder):
    """Lightning DDP on 2 CPU processes: the ranks' epochs are disjoint; a run resumed from the checkpoint saved after
    2 steps trains, on each rank, on exactly the batches the first run trained on after that point."""
    script = ROOT / "tests/streaming_ddp_script.py"
    common = [sys.executable, str(script), "--source", str(image_folder), "--cache", str(tmp_path / "cache")]
    subprocess.run([*common, "--out", str(tmp_path / "full"), "--save-at", "2"], check=True, timeout=400, cwd=ROOT)
    subprocess.run([*common, "--out", str(tmp_path / "resumed"), "--resume", str(tmp_path / "full" / "step.ckpt")],
                   check=True, timeout=400, cwd=ROOT)
    full = [json.loads((tmp_path / "full" / f"rank{rank}.json").read_text())["ids"]["0"] for rank in range(2)]
    assert [len(ids) for ids in full] == [16, 16]  # 36 samples: 18 per rank, 4 batches of 4
    assert not set(full[0]) & set(full[1]) and set(full[0]) | set(full[1]) <= set(range(36))
    for rank in range(2):
        resumed = json.loads((tmp_path / "resumed" / f"rank{rank}.json").read_text())["ids"]
        assert resumed == {"0": full[rank][2 * 4:]}  # the epoch's last 2 batches, in order, nothing before them again


@pytest.fixture(scope="module")
def three_per_shard(image_folder, tmp_path_factory):
    """The 3-class folder in shards of 3 samples (12 training shards): batches of 4 straddle shards."""
    out = tmp_path_factory.mktemp("wide") / "set"
    dm = streaming(image_folder, cache_dir=str(out.parent / "cache"), shard_bytes=10**6, write_workers=1)
    manifest = dm.loader.write_shards(out)
    assert [shard["samples"] for shard in manifest["splits"]["train"]["shards"]] == [3] * 12
    return out


def _train_batches(shard_set, image_folder, cache) -> ShardBatches:
    dm = streaming(image_folder, remote=str(shard_set), cache_dir=str(cache))
    dm.setup("fit")
    entry, transform = dm.loader.manifest()["splits"]["train"], dm.loader.transform("train", True)
    return ShardBatches(dm.loader.store(), entry, transform, 4, True, 0, 1, dm.seed, dm.augment.seed, True)


def _logged_reads(monkeypatch, log: Path) -> None:
    """Every ``ShardStore.read`` appends ``<worker> <shard file>`` to ``log`` (forked workers inherit the patch)."""
    read = shards.ShardStore.read

    def logged(store, shard, wanted):
        info = torch.utils.data.get_worker_info()
        with open(log, "a") as stream:
            stream.write(f"{info.id if info else -1} {shard['file']}\n")
        return read(store, shard, wanted)

    monkeypatch.setattr(shards.ShardStore, "read", logged)


def _readers(log: Path) -> tuple[int, dict[str, set]]:
    """(shard reads, shard file -> the workers that read it) from ``_logged_reads``' log."""
    lines, readers = log.read_text().split(), {}
    for worker, name in zip(lines[::2], lines[1::2]):
        readers.setdefault(name, set()).add(worker)
    return len(lines) // 2, readers



@pytest.mark.parametrize("workers", [2, 4])
def test_each_worker_reads_only_the_shards_under_its_block(three_per_shard, image_folder, tmp_path, monkeypatch, workers):
    """Worker ``w`` serves a contiguous block of the rank's batches: a shard is read by at most the two workers whose
    blocks meet inside it, so an epoch reads at most shards + workers - 1 shard files (round-robin batches read
    nearly every shard in every worker)."""
    log = tmp_path / "reads.log"
    _logged_reads(monkeypatch, log)
    batches = _train_batches(three_per_shard, image_folder, tmp_path / "cache")
    served = _epoch(batches, 0, workers=workers)
    assert len(served) == 9  # 36 samples in batches of 4
    reads, readers = _readers(log)
    count = len(batches.entry["shards"])
    print(f"{workers} workers: {reads} shard reads of {count} shards")
    assert set(readers) == {shard["file"] for shard in batches.entry["shards"]}
    assert max(len(r) for r in readers.values()) <= 2
    assert reads <= count + workers - 1


def test_serving_order_interleaves_contiguous_blocks():
    """Blocks of sizes differing by at most one, longer first; one batch from each in turn (hand-computed)."""
    assert serving_order(list(range(9)), 2) == [0, 5, 1, 6, 2, 7, 3, 8, 4]  # blocks 0-4, 5-8
    assert serving_order(list(range(9)), 4) == [0, 3, 5, 7, 1, 4, 6, 8, 2]  # blocks 0-2, 3-4, 5-6, 7-8
    assert serving_order([2, 3, 4, 6, 7], 0) == [2, 3, 4, 6, 7]  # in process: the rank's order
    assert serving_order([4, 6, 7, 8], 3) == [4, 7, 8, 6] and serving_order([], 2) == []


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_serve_the_in_process_batches_in_block_order(three_per_shard, image_folder, tmp_path, workers):
    """Only the order depends on the worker count: the same batches (indices, pixels) as in process, every
    training sample once."""
    batches = _train_batches(three_per_shard, image_folder, tmp_path / "cache")
    in_order, served = _epoch(batches, 1, workers=0), _epoch(batches, 1, workers=workers)
    assert sorted(b[2].tolist() for b in served) == sorted(b[2].tolist() for b in in_order)
    assert sorted(torch.cat([b[2] for b in served]).tolist()) == list(range(36))
    assert all(_same(a, in_order[b]) for a, b in zip(served, serving_order(list(range(9)), workers), strict=True))


class _Fit(SimpleNamespace):
    """What ``ImageDataModule`` reads from a Lightning trainer inside ``fit`` (epoch 1, ``processed`` batches done)."""

    def __init__(self, processed: int):
        progress = SimpleNamespace(current=SimpleNamespace(processed=processed), is_last_batch=False)
        super().__init__(world_size=1, global_rank=0, training=True, current_epoch=1, num_training_batches=9,
                         state=SimpleNamespace(fn="fit"), fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                             batch_progress=progress)))

    def trained(self, count: int) -> None:
        self.fit_loop.epoch_loop.batch_progress.current.processed = count


def _resumed_run(three_per_shard, image_folder, cache, workers: int, position: dict | None, take: int):
    """A process resumed from ``position`` with ``workers`` workers: the first ``take`` batches it serves, and the
    checkpoint's ``train_position`` after them."""
    dm = streaming(image_folder, num_workers=workers, remote=str(three_per_shard), cache_dir=str(cache))
    dm.setup("fit")
    done = 0 if position is None else position["batches"]
    dm.trainer = _Fit(done)
    if position is not None:
        dm.load_state_dict({"train_position": position})
    batches = iter(dm.train_dataloader())
    taken = [next(batches) for _ in range(take)]
    del batches  # its workers stop now, not in a later loader's forked worker
    gc.collect()
    dm.trainer.trained(done + take)
    return taken, dm.state_dict()["train_position"]


def test_killed_twice_in_an_epoch_resumes_with_other_worker_counts(three_per_shard, image_folder, tmp_path):
    """3 batches with 2 workers, 2 with 1, the rest with 3: the checkpoints name the trained batches, and the three
    runs train each of the epoch's 9 in-process batches once (indices and pixels)."""
    cache = tmp_path / "cache"
    first, position = _resumed_run(three_per_shard, image_folder, cache, 2, None, 3)
    assert position["batches"] == 3 and position["trained_batches"] == [[0, 2], [5, 6]]  # served 0, 5, 1
    second, position = _resumed_run(three_per_shard, image_folder, cache, 1, position, 2)
    assert position["batches"] == 5 and position["trained_batches"] == [[0, 4], [5, 6]]  # then 2, 3
    third, position = _resumed_run(three_per_shard, image_folder, cache, 3, position, 4)  # 4, 7, 8, 6
    assert position["batches"] == 9 and position["complete"] and "trained_batches" not in position  # skipped whole
    in_order = _epoch(_train_batches(three_per_shard, image_folder, cache), 1, workers=0)
    trained = first + second + third
    assert sorted(b[2].tolist() for b in trained) == sorted(b[2].tolist() for b in in_order)
    assert all(_same(a, in_order[b]) for a, b in zip(trained, [0, 5, 1, 2, 3, 4, 7, 8, 6], strict=True))


def test_a_position_written_as_a_count_resumes_after_the_first_batches(three_per_shard, image_folder, tmp_path):
    """A checkpoint without ``trained_batches`` (written when workers served the rank's order round-robin): its
    ``batches`` first batches have trained; 2 workers serve the other 6 as blocks 3-5 and 6-8."""
    cache = tmp_path / "cache"
    old = {"epoch": 1, "batches": 3, "batch_size": 4, "world_size": 1, "complete": False, "samples": 12}
    rest, position = _resumed_run(three_per_shard, image_folder, cache, 2, old, 6)
    assert position["complete"]
    in_order = _epoch(_train_batches(three_per_shard, image_folder, cache), 1, workers=0)
    assert all(_same(a, in_order[b]) for a, b in zip(rest, [3, 6, 4, 7, 5, 8], strict=True))
    _, position = _resumed_run(three_per_shard, image_folder, cache, 2, old, 2)
    assert position["trained_batches"] == [[0, 4], [6, 7]]  # served 3, 6


def test_eval_workers_read_only_the_shards_under_their_blocks(image_folder, tmp_path, monkeypatch):
    """24 validation samples in 12 shards of 2, batches of 1, 2 workers: each worker serves 12 consecutive batches
    (6 shards), 12 shard reads an epoch; dealing batches round-robin had both workers read all 12 (24 reads). Every
    validation index once, the in-process batches in ``serving_order``."""
    dm = ImageDataModule(source=str(image_folder), batches=WithIndex(), loader=StreamingLoader(
        cache_dir=str(tmp_path / "cache"), shard_bytes=10**6, write_workers=1),
        **{**SETTINGS, "val_fraction": 0.5, "batch_size": 1})
    dm.prepare_data()
    dm.setup("validate")
    entry = dm.loader.manifest()["splits"]["val"]
    assert [shard["samples"] for shard in entry["shards"]] == [2] * 12
    log = tmp_path / "reads.log"
    _logged_reads(monkeypatch, log)
    served = list(dm.val_dataloader())
    reads, readers = _readers(log)
    print(f"2 eval workers: {reads} shard reads of 12 shards")
    assert reads == 12 and len(readers) == 12 and all(len(r) == 1 for r in readers.values())
    assert sorted(torch.cat([batch[2] for batch in served]).tolist()) == list(range(24))
    dm.num_workers = 0
    in_process = list(dm.val_dataloader())
    assert [int(b[2]) for b in in_process] == list(range(24))  # one worker: the index order
    assert all(_same(a, in_process[b]) for a, b in zip(served, serving_order(list(range(24)), 2), strict=True))


def test_extra_eval_sets_are_shard_sets_of_their_own_beside_a_remote_set(shard_set, image_folder, tmp_path):
    """An extra set (an ImageFolder named as the remote set's classes) is written once into the cache as its own
    shard set and served as the torchvision back-end serves it: the same pixels, labels and indices."""
    extra = tmp_path / "extra"
    names = sorted(p.name for p in image_folder.iterdir())
    for name in names[1:]:  # two of the three classes, 5 images each: labels 1 and 2
        (extra / name).mkdir(parents=True)
        for file in sorted((image_folder / name).iterdir())[:5]:
            (extra / name / file.name).write_bytes(file.read_bytes())
    ours = ImageDataModule(source=str(tmp_path / "absent"), extra_eval={"more": str(extra)}, batches=WithIndex(),
                           loader=StreamingLoader(remote=str(shard_set), cache_dir=str(tmp_path / "cache")), **SETTINGS)
    ours.prepare_data()
    ours.setup("validate")
    written = list((tmp_path / "cache").glob("eval-more-*"))
    assert len(written) == 1 and json.loads((written[0] / shards.MANIFEST).read_text())["splits"]["val"]["samples"] == 10
    theirs = ImageDataModule(source=str(image_folder), extra_eval={"more": str(extra)}, loader=TorchvisionLoader(),
                             batches=WithIndex(), **SETTINGS)
    theirs.setup("validate")
    (_, mine), (_, reference) = ours.val_dataloader(), theirs.val_dataloader()
    served, reference = list(mine), list(reference)
    assert len(served) == 3 and serving_order([0, 1, 2], 2) == [0, 2, 1]  # batches of 4, 4, 2
    assert all(_same(a, reference[b]) for a, b in zip(served, [0, 2, 1], strict=True))
    assert sorted(torch.cat([b[1] for b in served]).tolist()) == [1] * 5 + [2] * 5
    ours.prepare_data()  # written once: the same folder, not rewritten
    assert list((tmp_path / "cache").glob("eval-more-*")) == written
