"""The streaming loader back-end: WebDataset shards read from a local folder or a remote store through a bounded
cache, each rank and worker reading its own shards, resumable sample for sample.

Why WebDataset rather than LitData (a quick measurement on a shared 2-core AMD EPYC, see /work/coord/NOTES.md):
on the same 1,000 photo JPEGs stored as their own bytes and read with the same crops, an epoch cost the same CPU
time through either (WebDataset/LitData 1.06x, WebDataset/torchvision ImageFolder 1.06x: JPEG decoding dominates),
while ``litdata.optimize`` wrote 20 images/s against 850 for two processes of WebDataset's ``TarWriter``. LitData's
reader also keeps the order, the cache eviction and the retries inside its own threads (a missing chunk is waited
for), and brings boto3 and obstore; tar shards are the format open_clip and timm's ``reader_wds`` stream. So the
shards are WebDataset's, and the plan (which rank and worker reads which sample, in which order, from which
cached file) is this module's, which gives every sample once per epoch and a sample-exact resume.

The plan: a rank takes a contiguous share of the epoch's order and cuts it into batches (batch ``b`` = samples
``[b*B, (b+1)*B)`` of the share, each sample's crop drawn from its position in the share). Training loader worker
``w`` of ``W`` serves a contiguous block of the rank's batches not yet trained (the ``w``-th of ``W`` blocks whose
sizes differ by at most one), so it reads only the shards under its block: a shard is read by at most the workers
whose blocks meet inside it (two, when a block is longer than a shard), an epoch reads about shards + W - 1 shard files,
where dealing batches round-robin had every worker read nearly every shard. ``DataLoader`` takes one batch from
each worker in turn, so batches are served interleaved (block 0's first, block 1's first, ..., block 0's second,
...): the serving order depends on the worker count, the batches (their samples and pixels) do not. A checkpoint
therefore records which of the rank's batches have trained (``trained_batches``, sorted ``[start, stop)`` ranges,
the same on every rank), and a resumed run, with any worker count, deals the rest out in blocks again. Evaluation
loaders deal their batches out in the same blocks (``worker_blocks``, the one rule for both), so they too read
about shards + W - 1 shard files an epoch where round-robin batches had every worker read every shard; their
batches come out in ``serving_order`` (the rank's order with one worker), each sample once, with its ``index``
when asked for: a consumer that pairs results with samples goes by the index, not by the position in the loader.
``data.extra_eval`` sets are written as shard sets of their own (``eval-<name>-<key>/``, one ``val`` split) and
read in place, beside a local or a remote training set.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules import shards
from datamodules.augment import step_seed
from datamodules.backend import EpochStart, LoaderBackend
from datamodules.sources import to_rgb
from modules.components.errors import ConfigError, DataError


# --- which samples a rank and a worker read, in which order ------------------------------------------
def epoch_order(shard_members: list[np.ndarray], seed: int, epoch: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(shard number, source index)`` of every sample in the epoch's global order: with ``shuffle`` the shards in
    a permutation seeded by (seed, epoch) and each shard's samples in one seeded by (seed, epoch, shard), so a run
    repeats its order and consecutive samples come from one shard (read once, as a unit); else as written."""
    numbers = np.arange(len(shard_members))
    if shuffle:
        numbers = np.random.default_rng([seed, epoch]).permutation(numbers)
    members = [np.random.default_rng([seed, epoch, int(k)]).permutation(shard_members[k]) if shuffle
               else shard_members[k] for k in numbers]
    lengths = [len(m) for m in members]
    return np.repeat(numbers, lengths), (np.concatenate(members) if members else np.zeros(0, np.int64))


def rank_range(total: int, rank: int, world: int, equal: bool) -> tuple[int, int]:
    """This rank's contiguous share of ``total`` samples: ``total // world`` each with ``equal`` (training: every rank
    takes as many steps; the < world left over are the epoch's last), else shares that differ by at most one."""
    if equal:
        share = total // world
        return rank * share, (rank + 1) * share
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def batch_ranges(batches) -> list[list[int]]:
    """Batch numbers as sorted half-open ``[start, stop)`` ranges (a checkpoint's ``trained_batches``)."""
    numbers, ranges = sorted(set(int(b) for b in batches)), []
    for number in numbers:
        if ranges and ranges[-1][1] == number:
            ranges[-1][1] += 1
        else:
            ranges.append([number, number + 1])
    return ranges


def remaining_batches(total: int, trained: list) -> list[int]:
    """The batch numbers of ``range(total)`` outside the ``trained`` ranges, in order."""
    done = np.zeros(total, dtype=bool)
    for start, stop in trained:
        done[max(0, int(start)): max(0, min(int(stop), total))] = True
    return np.flatnonzero(~done).tolist()


def worker_blocks(remaining: list[int], workers: int) -> list[list[int]]:
    """``remaining`` cut into ``workers`` contiguous blocks in order, the first ``len % workers`` one longer."""
    base, extra = divmod(len(remaining), workers)
    bounds = np.cumsum([0] + [base + (w < extra) for w in range(workers)])
    return [remaining[bounds[w]: bounds[w + 1]] for w in range(workers)]


def serving_order(remaining: list[int], workers: int) -> list[int]:
    """The order in which a ``DataLoader`` of ``workers`` workers (0: in process) serves ``worker_blocks``: each
    block's first batch, then each block's second... (it asks the workers in turn and keeps their answers in that
    order; a longer block comes first, so every worker still serving is asked before any has run out)."""
    blocks = worker_blocks(remaining, max(1, workers))
    return [block[i] for i in range(len(blocks[0]) if blocks else 0) for block in blocks if i < len(block)]


class ShardBatches(IterableDataset):
    """One rank's batches of one split, read from shards: worker ``w`` of ``W`` serves the ``w``-th contiguous block
    of the rank's batches outside ``trained`` (``worker_blocks``), decoding only its own samples of the shards under
    its block, which are all it reads. ``DataLoader`` interleaves the blocks (``serving_order``): which batches
    there are does not depend on ``W``, the order they come out in does. Evaluation batches (``train`` false) are
    dealt out the same way (all of them, none dropped, centre crops).

    Training batches drop the rank's last partial batch and draw each sample's crop and flip from
    ``step_seed(augment_seed, rank, epoch, position)`` (its position in the rank's epoch order), so a batch is the
    same whichever worker serves it; ``epoch`` and ``trained`` (sorted ``[start, stop)`` ranges of batch numbers
    a resumed run leaves out) are set before each epoch's workers start.
    """

    def __init__(self, store: shards.ShardStore, split_entry: dict, transform, batch_size: int, train: bool,
                 rank: int, world: int, seed: int, augment_seed: int, with_index: bool, indices=None):
        self.store, self.entry, self.transform, self.batch_size, self.train = store, split_entry, transform, batch_size, train
        self.rank, self.world, self.seed, self.augment_seed, self.with_index = rank, world, seed, augment_seed, with_index
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.epoch, self.trained = 0, []

    def rank_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        shard_of, index = epoch_order(shards.shard_indices(self.entry), self.seed, epoch, self.train)
        if self.indices is not None:
            keep = np.isin(index, self.indices)
            shard_of, index = shard_of[keep], index[keep]
        start, stop = rank_range(len(index), self.rank, self.world, equal=self.train)
        return shard_of[start:stop], index[start:stop]

    def num_batches(self, samples: int) -> int:
        return samples // self.batch_size if self.train else -(-samples // self.batch_size)

    def __len__(self) -> int:
        total = self.entry["samples"] if self.indices is None else len(self.indices)
        start, stop = rank_range(total, self.rank, self.world, equal=self.train)
        return self.num_batches(stop - start)

    def remaining(self) -> list[int]:
        """This epoch's batch numbers outside ``trained``, in the rank's order."""
        return remaining_batches(len(self), self.trained)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard_of, index = self.rank_order(self.epoch)
        remaining = remaining_batches(self.num_batches(len(index)), self.trained)
        mine = worker_blocks(remaining, workers)[worker]
        spans = [(b * self.batch_size, min((b + 1) * self.batch_size, len(index))) for b in mine]
        wanted: dict[int, set] = {}
        last_use: dict[int, int] = {}
        for number, (start, stop) in enumerate(spans):
            for shard, source_index in zip(shard_of[start:stop].tolist(), index[start:stop].tolist()):
                wanted.setdefault(shard, set()).add(source_index)
                last_use[shard] = number
        loaded: dict[int, dict] = {}
        for number, (start, stop) in enumerate(spans):
            images, labels = [], []
            for position in range(start, stop):
                shard, source_index = int(shard_of[position]), int(index[position])
                if shard not in loaded:
                    entry = self.entry["shards"][shard]
                    loaded[shard] = self.store.read(entry, wanted[shard])
                sample = loaded[shard].get(source_index)
                if sample is None or "cls" not in sample:
                    raise DataError(f"shard {self.store.url(self.entry['shards'][shard]['file'])} lacks sample "
                                    f"{source_index} that the manifest puts there: write the shards again")
                images.append(self.decode(sample, source_index, position))
                labels.append(int(sample["cls"]))
            for shard in [s for s, last in last_use.items() if last == number and s in loaded]:
                del loaded[shard]  # no later batch of this worker needs it
            if len({tuple(image.shape) for image in images}) > 1:
                raise ConfigError("training images differ in size: set data.init_args.batches.init_args.decode_size "
                                  "(e.g. 256) to decode them at one size")
            batch = (torch.stack(images), torch.tensor(labels, dtype=torch.int64))
            yield (*batch, torch.as_tensor(index[start:stop], dtype=torch.int64)) if self.with_index else batch

    def decode(self, sample: dict, source_index: int, position: int) -> torch.Tensor:
        extension = next((e for e in sample if e not in {"cls", "txt"}), None)
        try:
            with Image.open(io.BytesIO(sample[extension])) as image:
                image = to_rgb(image)
        except Exception as err:
            raise DataError(f"sample {source_index} ({extension}) of the shard set cannot be decoded ({err}): "
                            "write the shards again") from err
        if not self.train:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms draw from the global stream
            torch.default_generator.manual_seed(step_seed(self.augment_seed, self.rank, self.epoch, position))
            return self.transform(image)


class _OneLineErrors:
    """A loader epoch whose ``DataError``s raised in a worker reach the caller as their own one line (torch wraps them
    in the worker's traceback)."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.batches)
        except (DataError, ConfigError) as err:
            message = str(err).strip().splitlines()[-1]
            for name in ("DataError: ", "ConfigError: "):
                message = message.split(name, 1)[-1]
            raise type(err)(message) from None


class ShardLoader:
    """A ``DataLoader`` over ``ShardBatches``, new workers each epoch (they copy the epoch and the trained batches).
    Training loaders start their epoch at its first batch, where the DataModule says which epoch it is and how many
    batches a resumed run already trained on (``LoaderBackend``'s contract) and the back-end which ones
    (``StreamingLoader.trained_before``); ``trained_after`` says which have trained once Lightning counts ``n``."""

    def __init__(self, batches: ShardBatches, num_workers: int, datamodule=None):
        self.batches, self.num_workers, self.datamodule = batches, num_workers, datamodule
        self.started = 0
        self.epoch: int | None = None  # the training epoch started last
        self.served: list[int] = []  # its remaining batches in the order this loader serves them

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        if self.datamodule is None:
            return self._epoch()
        return EpochStart(self._start_epoch)

    def _start_epoch(self):
        epoch, skip = self.datamodule.train_epoch_start(self.started)
        self.started += 1
        return self.start(epoch, self.datamodule.loader.trained_before(epoch, skip, len(self)))

    def start(self, epoch: int, trained: list) -> _OneLineErrors:
        """Epoch ``epoch`` without the ``trained`` batches (``[start, stop)`` ranges of batch numbers)."""
        self.batches.epoch, self.batches.trained = epoch, batch_ranges(_numbers(trained, len(self)))
        self.epoch = epoch
        remaining = self.batches.remaining()
        self.served = serving_order(remaining, self._workers(len(remaining)))
        return self._epoch()

    def trained_after(self, count: int) -> list[list[int]]:
        """The batches of the started epoch trained once ``count`` of them have (Lightning's count, the batches
        trained before this run's resume included): those, plus the first served since."""
        before = len(self) - len(self.served)
        return batch_ranges([*_numbers(self.batches.trained, len(self)), *self.served[:max(0, count - before)]])

    def _workers(self, remaining: int) -> int:
        return min(self.num_workers, max(1, remaining))

    def _epoch(self):
        workers = self._workers(len(self.batches.remaining()))
        loader = DataLoader(self.batches, batch_size=None, num_workers=workers,
                            pin_memory=torch.cuda.is_available(), multiprocessing_context="fork" if workers else None)
        return _OneLineErrors(loader)


def _default_writers() -> int:
    from datamodules.beton import default_writers

    return default_writers()


def _local_manifest(folder: Path) -> dict:
    """The manifest of the shard set written into ``folder`` (by ``prepare_data``)."""
    path = folder / shards.MANIFEST
    if not path.is_file():
        raise ConfigError(f"{path} is missing: call prepare_data() first (the Trainer does); with a "
                          "cache_dir local to each node set data.loader.cache_shared false")
    try:
        return shards.check_manifest(json.loads(path.read_text()), str(path))
    except ValueError as err:
        raise DataError(f"{path} is not a readable manifest ({err}): delete {folder} and run again") from err


def _check_sizes(folder: Path, manifest: dict) -> None:
    """Every shard of the set written into ``folder`` is there at its manifest's size (a quick check; readers
    check the SHA-256)."""
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = folder / shard["file"]
            if not path.is_file():
                raise DataError(f"shard {path} listed in {folder / shards.MANIFEST} is missing: "
                                f"delete {folder} and run again to write the shards")
            if path.stat().st_size != shard["bytes"]:
                raise DataError(f"shard {path} is truncated or corrupt ({path.stat().st_size:,} bytes, the "
                                f"manifest says {shard['bytes']:,}): delete {folder} and run again")


def _numbers(ranges: list, total: int) -> list[int]:
    """The batch numbers below ``total`` in ``[start, stop)`` ranges."""
    return [b for start, stop in ranges for b in range(max(0, int(start)), min(int(stop), total))]


def _count(ranges: list) -> int:
    """Batches in disjoint ``[start, stop)`` ranges."""
    return sum(stop - start for start, stop in ranges)


class StreamingLoader(LoaderBackend):
    """The ``ImageDataModule``'s splits as WebDataset shards (``datamodules/shards.py``), decoded and cropped as the
    torchvision back-end does (PIL, the same random-resized crop and flip, the same centre crop), so the three
    back-ends train on the same distribution; device-side augmentation and normalisation are the DataModule's.

    Without ``remote`` the shards are written once into ``cache_dir/<name>-<key>/`` (the key covers the source and
    the selection, as for FFCV's ``.beton`` files) and read in place. With ``remote`` (a set written by ``visionlab
    prepare-data --format webdataset``: an ``http(s)://`` or ``file://`` URL, or a folder standing in for one) the
    source is not read: shards are copied into ``cache_dir/remote-<key>/`` as they are needed, at most
    ``cache_limit`` bytes at a time, least recently used first out.

    Each rank takes a contiguous share of the epoch's order (shards permuted per epoch, samples permuted within a
    shard), every sample once per epoch across ranks (training drops the fewer-than-``world_size`` left over and
    each rank's last partial batch, as the other back-ends drop theirs). Each loader worker serves a contiguous
    block of the rank's batches and reads only the shards under it (about shards + workers - 1 shard reads an
    epoch); batches come out interleaved across the blocks, in an order that depends on ``num_workers`` while the
    batches themselves do not. Checkpoints record which batches have trained (``trained_batches``); a resumed
    run, with any ``num_workers``, skips those without reading them and deals the rest out in blocks. Evaluation
    loaders serve their blocks the same way (``serving_order``), so a consumer that needs a sample's place goes by
    its ``index`` (the torchvision back-end serves validation in index order).

    ``data.extra_eval`` sets (ImageFolder trees) are written by ``prepare_data`` as shard sets of their own into
    ``cache_dir/eval-<name>-<key>/`` (keyed by the set's files and labels after the class and ``val_limit``
    selection, and ``shard_bytes``; FFCV keys its extra ``.beton`` files by the same selection) and read in place,
    whether the training set is local or ``remote`` (their folders then name the classes the remote set was
    written with, which its manifest records in full unless it was written with ``data.classes``).

    Args:
        cache_dir: folder of written shard sets and of remote shards' cache.
        remote: a prepared shard set to read instead of the source.
        cache_limit: most bytes of remote shards kept on local disk (``"2GB"``, ``500000000``); ``None``: no limit.
            Give it room for a shard per loader worker of every rank on the node, plus one.
        shard_bytes: target size of a written shard.
        write_workers: writer processes (default: the cores available).
        cache_shared: ``cache_dir`` is on a file system every node sees (one writer for all); false: one per node.
        retries: tries after a failed transfer before the run stops with the file's name.
        retry_wait: seconds before the first retry (then 2x, 3x...).
        timeout: seconds one remote transfer may stall.
    """

    def __init__(self, cache_dir: str = "~/.cache/visionlab/shards", remote: str | None = None,
                 cache_limit: int | str | None = None, shard_bytes: int | str = "64MB", write_workers: int | None = None,
                 cache_shared: bool = True, retries: int = 3, retry_wait: float = 1.0, timeout: float = 30.0):
        self.cache_dir = Path(cache_dir).expanduser()
        if remote is not None and "://" in remote and not remote.startswith(("http://", "https://", "file://")):
            raise ConfigError(f"data.loader.remote {remote!r}: the streaming back-end reads http(s):// and file:// URLs "
                              "and folders; mount other stores (s3fs, gcsfuse) or serve them over https")
        self.remote = remote
        self.cache_limit, self.shard_bytes = shards.parse_bytes(cache_limit), shards.parse_bytes(shard_bytes)
        if self.cache_limit is not None and self.cache_limit <= 0:
            raise ConfigError(f"data.loader.cache_limit {cache_limit} must be positive")
        self.write_workers, self.retries, self.retry_wait, self.timeout = write_workers, retries, retry_wait, timeout
        self.prepare_data_per_node = not cache_shared
        self._manifest: dict | None = None
        self._extra_manifests: dict[str, dict] = {}
        self._training: ShardLoader | None = None  # the training loader last built (its started epoch's plan)
        self._resumed: tuple[int, list] | None = None  # a checkpoint's (epoch, trained_batches)

    # --- where the shards are ----------------------------------------------------------------------
    def selection(self) -> dict:
        return {**self.datamodule.sample_selection(), "captions_file": self._captions_file()}

    def _captions_file(self) -> str | None:
        captions = getattr(self.datamodule.batches, "captions_file", None)
        return str(Path(captions).expanduser().resolve()) if captions else None

    def folder(self) -> Path:
        """The local folder of this data's shards: the written set, or the remote set's cache."""
        if self.remote is not None:
            return self.cache_dir / f"remote-{hashlib.sha1(str(self.remote).encode()).hexdigest()[:12]}"
        key = json.dumps([self.selection(), self.shard_bytes], sort_keys=True)
        name = "embedded" if self.datamodule.is_embedded else Path(self.datamodule.source).name
        return self.cache_dir / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"

    def store(self) -> shards.ShardStore:
        if self.remote is None:
            return shards.ShardStore(str(self.folder()))
        return shards.ShardStore(self.remote, remote=True, cache=str(self.folder()), cache_limit=self.cache_limit,
                                 retries=self.retries, retry_wait=self.retry_wait, timeout=self.timeout)

    def manifest(self) -> dict:
        if self._manifest is None:
            if self.remote is not None:
                self._manifest = self.store().read_manifest()
            else:
                self._manifest = _local_manifest(self.folder())
        return self._manifest

    def class_names(self) -> list[str] | None:
        if self.remote is None:
            return None
        manifest, dm = self.manifest(), self.datamodule
        recorded = manifest["selection"]
        if dm.classes and list(dm.classes) != list(recorded["classes"] or []):
            raise ConfigError(f"data.classes is {dm.classes} but {self.remote} was written with {recorded['classes']}: "
                              "write the shards again with this setting or drop it from the config")
        return list(manifest["class_names"])

    def num_train_samples(self) -> int | None:
        return self.manifest()["splits"]["train"]["samples"] if self.remote is not None else None

    def source_classes(self) -> list[str] | None:
        """A remote set's classes as written (what names ``data.extra_eval``'s folders); local: the source's."""
        written = None if self.remote is None else self.manifest()
        if written is not None and written["selection"]["classes"]:
            raise ConfigError(f"{self.remote} was written with data.classes, so the full class list that names "
                              "data.extra_eval's folders is unknown: write the shards without data.classes")
        return None if written is None else list(written["classes"])

    # --- extra evaluation sets (data.extra_eval) -------------------------------------------------
    def extra_folder(self, name: str) -> Path:
        """The shard set of extra set ``name`` (its ``val`` split): ``cache_dir/eval-<name>-<key>``, keyed by the
        set's source fingerprint (its files, sizes, times and labels after the class and ``val_limit`` selection,
        so a changed folder is written again) and ``shard_bytes``."""
        key = json.dumps([self.datamodule.get_source(name).fingerprint, self.shard_bytes])
        return self.cache_dir / f"eval-{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"

    def _prepare_extras(self) -> None:
        """Write each extra set whose folder has no manifest yet."""
        dm = self.datamodule
        for name in dm.extra_eval:
            folder = self.extra_folder(name)
            if not (folder / shards.MANIFEST).is_file():
                source = dm.get_source(name)
                description = {"source": str(Path(dm.extra_eval[name]).expanduser().resolve()),
                               "source_fingerprint": {"val": source.fingerprint}}
                shards.write_shards(folder, {"val": source}, [str(n) for n in dm.class_names], description,
                                    self.shard_bytes, self.write_workers or _default_writers(), dm.seed)

    def _split_set(self, split: str) -> tuple[shards.ShardStore, dict]:
        """The store and manifest entry that serve ``split`` (``train``, ``val`` or an ``extra_eval`` name)."""
        if split in self.datamodule.extra_eval:
            folder = self.extra_folder(split)
            if split not in self._extra_manifests:
                self._extra_manifests[split] = _local_manifest(folder)
            return shards.ShardStore(str(folder)), self._extra_manifests[split]["splits"]["val"]
        if split not in shards.SPLITS:
            raise ConfigError(f"the streaming back-end has no split {split!r} (train, val and data.extra_eval's sets)")
        return self.store(), self.manifest()["splits"][split]

    # --- writing -----------------------------------------------------------------------------------
    def _captions(self) -> dict | None:
        """Per split, each sample's captions (``datamodules.captions.CaptionsFile``'s file), for the ``.txt`` members."""
        dm = self.datamodule
        if self._captions_file() is None:
            return None
        from datamodules.captions import read_captions

        captions, root, out = read_captions(self._captions_file()), Path(dm.source).expanduser(), {}
        for split in shards.SPLITS:
            files = dm.get_source(split).files
            keys = [[f.relative_to(root).as_posix()] + [f.relative_to(root / s).as_posix() for s in shards.SPLITS
                                                        if f.is_relative_to(root / s)] for f in files]
            out[split] = [next((captions[k] for k in ks if k in captions), []) for ks in keys]
        return out

    def write_shards(self, folder: Path | None = None) -> dict:
        """Write both splits' shards and the manifest into ``folder`` (default: the cache folder) from the source."""
        if self.remote is not None:
            raise ConfigError(f"data.loader.remote is set ({self.remote}): the shards are read from there, not written")
        dm = self.datamodule
        folder = Path(folder).expanduser() if folder is not None else self.folder()
        sources = {split: dm.get_source(split) for split in shards.SPLITS}
        description = {"selection": self.selection(), "source_fingerprint": {s: src.fingerprint for s, src in sources.items()}}
        self._manifest = shards.write_shards(folder, sources, [str(n) for n in dm.class_names], description,
                                             self.shard_bytes, self.write_workers or _default_writers(), dm.seed,
                                             self._captions())
        self._prepare_extras()
        return self._manifest

    def prepare_data(self) -> None:
        if self.remote is not None:
            self.manifest()  # the store answers (bounded retries), before any process starts reading it
        elif not (self.folder() / shards.MANIFEST).is_file():
            self.write_shards()
        self._prepare_extras()

    def setup(self, stage: str) -> None:
        self._manifest, self._extra_manifests = None, {}
        manifest = self.manifest()
        if self.remote is None:
            _check_sizes(self.folder(), manifest)
        for name in self.datamodule.extra_eval:
            folder = self.extra_folder(name)
            self._extra_manifests[name] = _local_manifest(folder)
            _check_sizes(folder, self._extra_manifests[name])

    # --- loaders -----------------------------------------------------------------------------------
    def transform(self, split: str, train: bool):
        """The torchvision back-end's transforms: the same crops and flips, the same centre crop."""
        from torchvision.transforms import v2

        from datamodules.torchvision_loader import CenterCropRatio, TorchvisionLoader

        dm = self.datamodule
        if split == "train" and dm.full_train_images:
            size = dm.batches.decode_size
            return v2.Compose([*([] if size is None else [CenterCropRatio(size, 1.0)]), v2.PILToTensor()])
        reference = TorchvisionLoader()
        reference.bind(dm)
        return reference.transform(train)

    def split_loader(self, split: str, train: bool, indices=None) -> ShardLoader:
        dm = self.datamodule
        store, entry = self._split_set(split)
        trainer = dm.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None and trainer.world_size > 1 else (0, 1)
        full = split == "train" and dm.full_train_images
        batches = ShardBatches(store, entry, self.transform(split, train),
                               dm.batch_size, train, rank, world, dm.seed, dm.augment.seed,
                               dm.yields_index or full, indices)
        loader = ShardLoader(batches, dm.num_workers, dm if train else None)
        if train:
            self._training = loader
        return loader

    # --- which batches have trained (the checkpoint's position) -----------------------------------
    def position_state(self, position) -> dict:
        """``{"trained_batches": ranges}``: which of this rank's batches of ``position.epoch`` have trained (every
        rank serves the same batch numbers in the same order), for the checkpoint beside ``position``'s count."""
        loader = self._training
        if position.complete:
            return {}
        if loader is not None and loader.epoch == position.epoch:
            return {"trained_batches": loader.trained_after(position.batches)}
        resumed = self._resumed  # saved again before the resumed epoch's first batch
        if resumed is not None and resumed[0] == position.epoch and _count(resumed[1]) == position.batches:
            return {"trained_batches": resumed[1]}
        return {"trained_batches": [[0, position.batches]]} if position.batches else {}

    def load_position_state(self, saved: dict) -> None:
        """Keep a checkpoint's ``trained_batches`` for ``trained_before``; a position without them (written before
        workers served blocks, when the first ``batches`` served were batches ``0..batches-1``) means those."""
        ranges = saved.get("trained_batches")
        self._resumed = None if ranges is None else (int(saved["epoch"]), batch_ranges(
            b for start, stop in ranges for b in range(int(start), int(stop))))

    def trained_before(self, epoch: int, skip: int, total: int) -> list[list[int]]:
        """The batches of ``epoch`` to leave out when the DataModule says ``skip`` of its ``total`` have trained:
        the checkpoint's ranges when they are of this epoch and count ``skip``, else the first ``skip``."""
        if skip and self._resumed is not None and self._resumed[0] == epoch:
            ranges = self._resumed[1]
            if len(_numbers(ranges, total)) == min(skip, total):
                return ranges
        return [[0, min(skip, total)]] if skip else []

    def decoded_pixels(self, decode_size: int | None) -> str:
        # The shards hold the source's own bytes (arrays as lossless PNG) decoded by PIL, as the torchvision back-end
        # decodes them: the same pixels, so logits stored through either replay through both.
        return "source" if decode_size is None else f"torchvision centre{decode_size}"
