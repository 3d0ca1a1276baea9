"""WebDataset shards of an image source: parallel atomic writes, a checksummed manifest, and a store to read them
from (a local folder, or a remote one through a bounded local cache).

A shard set is a folder of tar files in WebDataset's layout (``<key>.<ext>`` members grouped by key: the image as
its source file's bytes, or as a lossless PNG for in-memory arrays, ``.cls`` the label, ``.txt`` its captions when
a captions file was given; the key is the sample's position in the split's source, nine digits), so any WebDataset pipeline
(open_clip's ``--dataset-type webdataset``) reads it too. ``manifest.json``, written last, lists every shard
with its sample count, size and SHA-256. Training shards hold the split in a seeded random order (class folders
are listed class by class, and a shard is read as a unit); validation shards keep the source order. The whole
set is written into a hidden sibling folder and renamed into place, so a failed write leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from modules.components.errors import ConfigError, DataError

MANIFEST = "manifest.json"
FORMAT = "visionlab-shards/1"
SPLITS = ("train", "val")


def parse_bytes(size: int | str | None) -> int | None:
    """``1000``, ``"64MB"``, ``"2 GiB"`` -> bytes (``None`` passes through)."""
    if size is None or isinstance(size, int):
        return size
    text = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{size!r} is not a size: write bytes as 1000000, 64MB or 2GiB") from None


# --- writing ---------------------------------------------------------------------------------------
def encoded_image(source, index: int) -> tuple[str, bytes]:
    """``(extension, bytes)`` of sample ``index``: a file's own bytes (checked to open as an image), an array as PNG."""
    if hasattr(source, "files"):
        path = Path(source.files[index])
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except Exception as err:
            raise DataError(f"cannot decode image {path} ({err}): remove or replace the file") from err
        extension = path.suffix.lower().lstrip(".")
        return ("jpg" if extension == "jpeg" else extension), data
    array = np.asarray(source.images[index])  # (H, W) grey or (H, W, 3): kept as stored, lossless
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return "png", buffer.getvalue()


_JOB: dict = {}  # what the writer processes read: set before they fork


def _write_shard(task: tuple[str, str, int, np.ndarray]) -> dict:
    """Write one shard (``task`` = split, file path, shard number, source indices) and describe it."""
    split, path, _, indices = task
    source, captions = _JOB["sources"][split], _JOB["captions"].get(split)
    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as writer:  # mtime 0: same bytes
        for index in indices:
            extension, image = encoded_image(source, int(index))
            sample = {"__key__": f"{int(index):09d}", extension: image, "cls": str(int(source.labels[index])).encode()}
            if captions is not None:
                sample["txt"] = "\n".join(captions[int(index)]).encode()
            writer.write(sample)
    return {"file": Path(path).name, "samples": len(indices), "bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def samples_per_shard(source, shard_bytes: int, min_shards: int = 16, probe: int = 16) -> int:
    """Samples per shard so that a shard holds about ``shard_bytes`` (from encoding ``probe`` samples), and a split
    has at least ``min_shards`` shards when it has that many samples (ranks and workers read shards of their own)."""
    count = len(source)
    picks = np.linspace(0, count - 1, min(probe, count)).astype(int)
    mean = sum(len(encoded_image(source, int(i))[1]) + 4 * 512 for i in picks) / max(1, len(picks))  # + tar headers
    per_shard = max(1, int(shard_bytes // max(mean, 1)))
    return max(1, min(per_shard, -(-count // min_shards)))


def shard_order(samples: int, order_seed: int | None) -> np.ndarray:
    """The split's source indices in the order the shards hold them: a seeded permutation, or the source order."""
    return np.arange(samples) if order_seed is None else np.random.default_rng(order_seed).permutation(samples)


def shard_indices(split_entry: dict) -> list[np.ndarray]:
    """Each shard's source indices in file order, from the manifest entry of a split."""
    order = shard_order(split_entry["samples"], split_entry["order_seed"])
    bounds = np.cumsum([0] + [shard["samples"] for shard in split_entry["shards"]])
    return [order[bounds[k]: bounds[k + 1]] for k in range(len(split_entry["shards"]))]


def write_shards(folder: Path, sources: dict, class_names: list[str], description: dict, shard_bytes: int,
                 workers: int, order_seed: int, captions: dict | None = None) -> dict:
    """Write each split of ``sources`` (split -> image source) as shards plus ``manifest.json`` into ``folder``,
    with ``workers`` processes; atomically (a failure leaves ``folder`` as it was). Returns the manifest."""
    import multiprocessing

    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    splits = {}
    try:
        _JOB.update(sources=sources, captions=captions or {})
        for split, source in sources.items():
            if len(source) == 0:
                raise DataError(f"the {split} split is empty: nothing to write")
            seed = order_seed if split == "train" else None
            per_shard = samples_per_shard(source, shard_bytes)
            order = shard_order(len(source), seed)
            tasks = [(split, str(tmp / f"{split}-{k:05d}.tar"), k, order[start: start + per_shard])
                     for k, start in enumerate(range(0, len(source), per_shard))]
            print(f"visionlab: writing {len(source)} {split} images as {len(tasks)} shards into {folder} with "
                  f"{workers} processes", flush=True)
            start = time.perf_counter()
            if workers > 1 and len(tasks) > 1:
                with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
                    shards = pool.map(_write_shard, tasks, chunksize=1)
            else:
                shards = [_write_shard(task) for task in tasks]
            seconds = time.perf_counter() - start
            total = sum(shard["bytes"] for shard in shards)
            print(f"visionlab: wrote {len(source)} {split} images in {seconds:.1f} s "
                  f"({len(source) / max(seconds, 1e-9):.0f} images/s), {total / 2**20:.1f} MiB", flush=True)
            splits[split] = {"samples": len(source), "order_seed": seed, "shards": shards, "bytes": total,
                             "seconds": round(seconds, 3), "fingerprint": source.fingerprint}
        manifest = {"format": FORMAT, "num_classes": len(class_names), "class_names": list(class_names),
                    "classes": list(next(iter(sources.values())).classes), "splits": splits,
                    "write": {"shard_bytes": shard_bytes, "captions": bool(captions)}, **description,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if folder.exists():  # an older or incomplete set: moved aside, then removed once the new one is in place
            old = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _JOB.clear()
    return manifest


def check_manifest(manifest: dict, where: str) -> dict:
    if manifest.get("format") != FORMAT:
        raise DataError(f"{where} has format {manifest.get('format')!r}, expected {FORMAT!r}: write the shards again "
                        "with visionlab prepare-data --format webdataset")
    return manifest


# --- reading ---------------------------------------------------------------------------------------
class ShardStore:
    """Where a shard set's files are read from: its own folder (``root`` a path, read in place), or a remote one
    (``remote``: an ``http(s)://`` or ``file://`` URL, or a folder standing in for one) whose shards are copied
    into ``cache`` on first use, keeping the cache under ``cache_limit`` bytes by deleting the least recently used
    shards first. Transfers are retried ``retries`` times (``retry_wait`` seconds apart, ``timeout`` seconds each)
    and then fail with a ``DataError`` naming the file; a copied shard must match the manifest's size and SHA-256.

    The object is small and picklable: loader workers each hold one; the cache is shared between them (and between
    ranks on one node) under a lock file.
    """

    def __init__(self, root: str, remote: bool = False, cache: str | None = None, cache_limit: int | None = None,
                 retries: int = 3, retry_wait: float = 1.0, timeout: float = 30.0):
        self.root, self.remote = str(root), remote
        self.cache = Path(cache).expanduser() if cache else None
        self.cache_limit, self.retries, self.retry_wait, self.timeout = cache_limit, retries, retry_wait, timeout
        self._verified: set[str] = set()

    def url(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _open(self, name: str):
        """A readable stream of file ``name`` of the store (one try)."""
        url = self.url(name)
        if url.startswith(("http://", "https://")):
            return urllib.request.urlopen(url, timeout=self.timeout)
        return open(url[len("file://"):] if url.startswith("file://") else url, "rb")

    def _with_retries(self, name: str, action):
        last = None
        for attempt in range(self.retries + 1):
            try:
                return action()
            except (FileNotFoundError, urllib.error.HTTPError) as err:
                if isinstance(err, urllib.error.HTTPError) and err.code >= 500:
                    last = err
                else:
                    raise DataError(f"{self.url(name)} is missing from the shard store ({err}): write the shards "
                                    "again (visionlab prepare-data --format webdataset) or fix data.loader.remote") from err
            except (OSError, urllib.error.URLError, TimeoutError) as err:
                last = err
            if attempt < self.retries:
                time.sleep(self.retry_wait * (attempt + 1))
        raise DataError(f"cannot read {self.url(name)} from the shard store after {self.retries + 1} tries ({last}): "
                        "check that the store is reachable (data.loader.remote)") from last

    def read_manifest(self) -> dict:
        def read():
            with self._open(MANIFEST) as stream:
                return stream.read()
        text = self._with_retries(MANIFEST, read)
        try:
            manifest = json.loads(text)
        except ValueError as err:
            raise DataError(f"{self.url(MANIFEST)} is not a readable manifest ({err}): write the shards again") from err
        return check_manifest(manifest, self.url(MANIFEST))

    def local_path(self, shard: dict) -> Path:
        """A local file holding ``shard`` (a manifest entry), checked against its size and SHA-256."""
        if not self.remote:
            path = Path(self.root) / shard["file"]
            if not path.is_file():
                raise DataError(f"shard {path} listed in {Path(self.root) / MANIFEST} is missing: write the shards "
                                "again (delete the folder, or rerun visionlab prepare-data --format webdataset)")
            if str(path) not in self._verified:  # once per process: a flipped byte anywhere is caught
                _check_file(path, shard, str(path))
                self._verified.add(str(path))
            return path
        path = self.cache / shard["file"]
        if path.is_file() and path.stat().st_size == shard["bytes"]:
            os.utime(path)  # most recently used
            return path
        return self._fetch(shard)

    def read(self, shard: dict, wanted: set[int] | None) -> dict[int, dict]:
        """``read_shard`` of ``shard`` (a manifest entry) through ``local_path``. A remote shard that another reader
        evicted between its copy and its opening (a cache that holds few shards) is copied again."""
        for _ in range(3):
            try:
                return read_shard(self.local_path(shard), wanted, self.url(shard["file"]))
            except FileNotFoundError:
                if not self.remote:
                    raise DataError(f"shard {self.url(shard['file'])} disappeared while this run reads it: "
                                    "write the shards again and restart") from None
        raise DataError(f"shard {shard['file']} was evicted from the cache {self.cache} three times before it could be "
                        "read: raise data.loader.cache_limit to hold at least one shard per loader worker and rank")

    def _fetch(self, shard: dict) -> Path:
        if self.cache_limit is not None and shard["bytes"] > self.cache_limit:
            raise ConfigError(f"shard {shard['file']} ({shard['bytes']:,} bytes) is larger than data.loader.cache_limit "
                              f"({self.cache_limit:,}): raise the limit or write smaller shards")
        self.cache.mkdir(parents=True, exist_ok=True)
        path = self.cache / shard["file"]
        with open(self.cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch and eviction at a time in this cache folder
            if path.is_file() and path.stat().st_size == shard["bytes"]:
                os.utime(path)
                return path
            self._evict(shard["bytes"])
            tmp = self.cache / f".{shard['file']}.{uuid.uuid4().hex[:8]}.part"

            def copy():
                with self._open(shard["file"]) as stream, open(tmp, "wb") as out:
                    shutil.copyfileobj(stream, out, 2**20)
            try:
                self._with_retries(shard["file"], copy)
                _check_file(tmp, shard, self.url(shard["file"]))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return path

    def _evict(self, incoming: int) -> None:
        """Delete least recently used shards until ``incoming`` more bytes fit under the limit (lock held).
        A shard a reader still has open stays readable to it (it reads the shard whole, then closes it)."""
        if self.cache_limit is None:
            return
        files = sorted((p for p in self.cache.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime_ns)
        used = sum(p.stat().st_size for p in files)
        for old in files:
            if used + incoming <= self.cache_limit:
                break
            used -= old.stat().st_size
            old.unlink(missing_ok=True)

    def cache_bytes(self) -> int:
        """Bytes in the cache folder, counted under the fetch lock (shared): a reader in another process that
        fetches and evicts at the same time would otherwise delete a file between its listing and its stat."""
        if self.cache is None or not self.cache.is_dir():
            return 0
        with open(self.cache / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            return sum(p.stat().st_size for p in self.cache.iterdir() if p.is_file())


def _check_file(path: Path, shard: dict, name: str) -> None:
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise DataError(f"shard {name} is truncated or corrupt ({size:,} bytes, the manifest says {shard['bytes']:,}): "
                        "write the shards again")
    if file_sha256(path) != shard["sha256"]:
        raise DataError(f"shard {name} is corrupt (its SHA-256 differs from the manifest's): write the shards again")


def read_shard(path: Path, wanted: set[int] | None, name: str) -> dict[int, dict]:
    """``{source index: {extension: bytes}}`` of the samples in shard file ``path`` (only ``wanted`` ones); ``name``
    is the shard's name in errors."""
    samples: dict[int, dict] = {}
    stream = open(path, "rb")  # FileNotFoundError passes: the caller copies an evicted shard again
    try:
        with stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                index = int(key)
                if wanted is not None and index not in wanted:
                    continue
                samples.setdefault(index, {})[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, ValueError, EOFError, OSError) as err:
        raise DataError(f"shard {name} is corrupt or truncated ({type(err).__name__}: {err}): write the shards again") from err
    return samples
