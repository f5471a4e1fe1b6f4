"""Where the data comes from: MNIST, Fashion-MNIST (IDX files) and scikit-learn's 8×8 digits.

IDX datasets are looked for, in order, in ``data_dir`` (``--data-dir``), ``$BATCHNORM_DATA``,
the user cache (``$XDG_CACHE_HOME/batchnorm`` or ``~/.cache/batchnorm``), for Fashion-MNIST also
the Debian package's ``/usr/share/datasets/fashion-mnist``; then they are downloaded into the
user cache from public mirrors, each file checked against its published SHA-256, with short
time-outs so that a machine without network fails in seconds. ``$BATCHNORM_NO_DOWNLOAD=1``
skips the download.

Inside a root directory the files may sit directly, in ``<root>/<name>/`` or in torchvision's
``<root>/<MNIST|FashionMNIST>/raw/``; each may be gzipped (``.gz``) or not.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .idx import read_idx

__all__ = [
    "DATASETS",
    "Dataset",
    "DataNotFoundError",
    "best_available",
    "cache_dir",
    "load_dataset",
]

DATASETS = ("mnist", "fashion-mnist", "digits")
FILES = {  # role -> file name (without .gz)
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the published .gz files (the same values TensorFlow Datasets and torchvision's
# mirrors serve; MNIST: 9,912,422 / 28,881 / 1,648,877 / 4,542 bytes).
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
SYSTEM_DIRS = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)}
_SUBDIRS = {"mnist": ("mnist", "MNIST/raw"), "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw")}
TIMEOUT_S = 10.0  # per request: connect + each read; the whole file gets 20× that


class DataNotFoundError(FileNotFoundError):
    """The dataset is neither on disk nor downloadable; the message lists the alternatives."""


@dataclass
class Dataset:
    """Images as float32 (N, 1, 28, 28) in [0, 1]; labels int64 in [0, 10)."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str  # where it was read from (a directory, or "sklearn.datasets.load_digits")

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, source={self.source!r})"
        )


def cache_dir() -> Path:
    """The user cache for downloads: ``$XDG_CACHE_HOME/batchnorm`` or ``~/.cache/batchnorm``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchnorm"


def check_data_dir(data_dir: str | os.PathLike | None) -> None:
    """A ``--data-dir`` the user names must exist: silently looking elsewhere would train on other
    data than asked for (and record the missing path in config.json)."""
    if data_dir not in (None, "") and not Path(data_dir).expanduser().is_dir():
        raise DataNotFoundError(
            f"--data-dir {data_dir} is not a directory; give the folder holding the dataset "
            f"files, or leave --data-dir out to use $BATCHNORM_DATA, the cache or the system copy"
        )


def _roots(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    check_data_dir(data_dir)
    roots = []
    for r in (data_dir, os.environ.get("BATCHNORM_DATA") or None, cache_dir()):
        if r is not None:
            roots.append(Path(r).expanduser())
    dirs = []
    for r in roots:
        dirs += [r] + [r / s for s in _SUBDIRS[name]]
    return dirs + list(SYSTEM_DIRS.get(name, ()))


def _find_files(d: Path) -> dict[str, Path] | None:
    found = {}
    for role, stem in FILES.items():
        for cand in (d / f"{stem}.gz", d / stem):
            if cand.is_file():
                found[role] = cand
                break
        else:
            return None
    return found


def _to_images(a: np.ndarray) -> Tensor:
    return torch.from_numpy(a).to(torch.float32).div_(255.0).unsqueeze(1).contiguous()


def _read_idx_set(name: str, files: dict[str, Path], source: str) -> Dataset:
    arrays = {}
    for role, path in files.items():
        if role.endswith("_x"):
            arrays[role] = read_idx(path, expect_shape=(None, 28, 28), expect_dtype="uint8")
        else:
            arrays[role] = read_idx(path, expect_ndim=1, expect_dtype="uint8")
    for split in ("train", "test"):
        nx, ny = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
        if nx != ny:
            raise ValueError(
                f"{name}: {files[f'{split}_x']} has {nx} images but {files[f'{split}_y']} has "
                f"{ny} labels; the two files must come from the same release"
            )
        bad = arrays[f"{split}_y"].max(initial=0)
        if bad > 9:
            raise ValueError(f"{name}: {files[f'{split}_y']} holds label {bad}; expected 0..9")
    return Dataset(
        name=name,
        train_x=_to_images(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=_to_images(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        source=source,
    )


def _fetch(url: str, timeout: float) -> bytes:
    """GET ``url`` in a daemon thread, so that even a hanging DNS lookup ends at the deadline."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                box["data"] = r.read()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout * 20)
    if t.is_alive():
        raise TimeoutError(f"no complete answer from {url} within {timeout * 20:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["data"]  # type: ignore[return-value]


def download(name: str, dest: Path | None = None, *, timeout: float = TIMEOUT_S) -> Path:
    """Download ``name``'s four files into ``dest`` (default: the user cache), SHA-256 checked.

    Tries each mirror in turn; raises :class:`DataNotFoundError` naming what failed.
    """
    if name not in MIRRORS:
        raise ValueError(f"no download source for {name!r}; downloadable: {sorted(MIRRORS)}")
    dest = Path(dest) if dest is not None else cache_dir() / name
    errors = []
    for fname, sha in SHA256[name].items():
        target = dest / fname
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha:
            continue
        for mirror in MIRRORS[name]:
            try:
                data = _fetch(mirror + fname, timeout)
            except Exception as e:  # noqa: BLE001 - network errors of every kind
                errors.append(f"{mirror}{fname}: {type(e).__name__}: {e}")
                continue
            got = hashlib.sha256(data).hexdigest()
            if got != sha:
                errors.append(f"{mirror}{fname}: SHA-256 {got} does not match the expected {sha}")
                continue
            dest.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{fname}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            break
        else:
            raise DataNotFoundError(f"could not download {name}:\n  " + "\n  ".join(errors))
    return dest


def _not_found(name: str, searched: list[Path], why: str) -> DataNotFoundError:
    where = "\n  ".join(str(p) for p in searched)
    others = [d for d in DATASETS if d != name]
    return DataNotFoundError(
        f"{name} is not available.\nLooked in:\n  {where}\nDownload: {why}\n"
        f"Alternatives: put the four IDX files ({', '.join(FILES.values())}, .gz or not) in a "
        f"directory and pass --data-dir DIR or set $BATCHNORM_DATA=DIR; or use "
        + " / ".join(f"--dataset {o}" for o in others)
        + " (digits needs no files; Fashion-MNIST: apt-get install dataset-fashion-mnist)."
    )


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2)).clamp_(0.0, 1.0)  # (N, 1, 28, 28)
    return x.numpy(), d.target.astype(np.int64)


def _digits() -> Dataset:
    """scikit-learn's 1,797 8×8 digits, scaled to 24×24 (bilinear) and padded to 28×28.

    Deterministic split: a fixed permutation (numpy seed 0), the first 297 images are the test set.
    """
    xa, ya = _digits_arrays()
    x, y = torch.from_numpy(xa.copy()), torch.from_numpy(ya.copy())  # callers may modify theirs
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    test, train = perm[:297], perm[297:]
    return Dataset(
        "digits",
        x[train].contiguous(),
        y[train],
        x[test].contiguous(),
        y[test],
        "sklearn.datasets.load_digits",
    )


def locate(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The directory holding ``name``'s IDX files, or None (no download attempted)."""
    if name not in MIRRORS:
        raise ValueError(f"unknown IDX dataset {name!r}; expected one of {sorted(MIRRORS)}")
    for d in _roots(name, data_dir):
        if _find_files(d) is not None:
            return d
    return None


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, *, download_ok: bool | None = None
) -> Dataset:
    """Load ``"mnist"``, ``"fashion-mnist"`` or ``"digits"`` (see the module docstring for where).

    ``download_ok`` (default: unless ``$BATCHNORM_NO_DOWNLOAD`` is set) allows the download step.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    check_data_dir(data_dir)
    if name == "digits":
        return _digits()
    d = locate(name, data_dir)
    if d is None:
        if download_ok is None:
            download_ok = os.environ.get("BATCHNORM_NO_DOWNLOAD", "") in ("", "0")
        if not download_ok:
            raise _not_found(name, _roots(name, data_dir), "disabled ($BATCHNORM_NO_DOWNLOAD)")
        try:
            d = download(name)
        except DataNotFoundError as e:
            raise _not_found(name, _roots(name, data_dir), str(e)) from None
    return _read_idx_set(name, _find_files(d), str(d))


def best_available(
    data_dir: str | os.PathLike | None = None, *, download_ok: bool | None = None
) -> str:
    """``"mnist"`` if on disk or downloadable, else ``"fashion-mnist"`` if on disk, else ``"digits"``."""
    if locate("mnist", data_dir) is not None:
        return "mnist"
    if download_ok is None:
        download_ok = os.environ.get("BATCHNORM_NO_DOWNLOAD", "") in ("", "0")
    if download_ok:
        try:
            download("mnist")
            return "mnist"
        except DataNotFoundError:
            pass
    if locate("fashion-mnist", data_dir) is not None:
        return "fashion-mnist"
    return "digits"
