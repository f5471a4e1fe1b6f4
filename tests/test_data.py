"""batchnorm.research.data: IDX round trips, every malformed-file case, source search order, fast download failure."""

from __future__ import annotations

import gzip
import struct
import time
import urllib.request

import numpy as np
import pytest
import torch

from batchnorm.research.data import (
    DataNotFoundError,
    IDXError,
    best_available,
    load_dataset,
    read_idx,
    sources,
    write_idx,
)

FILES = sources.FILES


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No real cache, no $BATCHNORM_DATA, no system dirs, no network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BATCHNORM_DATA", raising=False)
    monkeypatch.delenv("BATCHNORM_NO_DOWNLOAD", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {})

    def offline(url, timeout=None):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)


def make_idx_set(d, n_train=12, n_test=5, gz=True, seed=0):
    """Four small IDX files like MNIST's; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for role, a in arrays.items():
        write_idx(d / (FILES[role] + (".gz" if gz else "")), a)
    return arrays


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_every_dtype(tmp_path, dtype, gz):
    a = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype == "uint8":
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = write_idx(tmp_path / ("x.idx" + (".gz" if gz else "")), a)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == gz
    b = read_idx(p)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_idx_header_layout_is_big_endian(tmp_path):
    p = write_idx(tmp_path / "x.idx", np.array([1, 258], dtype=np.int16))
    raw = p.read_bytes()
    assert raw[:4] == b"\x00\x00\x0b\x01" and struct.unpack(">I", raw[4:8]) == (2,)
    assert raw[8:] == b"\x00\x01\x01\x02"


def _raw(code=0x08, dims=(2, 2), payload=None):
    payload = bytes(i % 256 for i in range(int(np.prod(dims)))) if payload is None else payload
    return struct.pack(">HBB", 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),
        (_raw(code=0x07), "unknown IDX dtype code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00", "too short"),
        (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02", "truncated header"),
        (_raw(dims=(2, 2), payload=b"\x00\x01\x02"), "truncated"),
        (_raw(dims=(2, 2), payload=b"\x00" * 5), "trailing bytes"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_malformed_idx_raises_naming_the_file(tmp_path, raw, match, gz):
    p = tmp_path / ("bad-file.idx" + (".gz" if gz else ""))
    p.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(IDXError, match=match) as e:
        read_idx(p)
    assert "bad-file.idx" in str(e.value)


def test_truncated_gzip_stream_is_an_idx_error(tmp_path):
    p = tmp_path / "cut.gz"
    p.write_bytes(gzip.compress(_raw(dims=(50, 50)))[:-20])
    with pytest.raises(IDXError, match="cut.gz"):
        read_idx(p)


def test_expectations_reject_the_wrong_kind_of_file(tmp_path):
    p = write_idx(tmp_path / "labels.idx", np.zeros(4, np.uint8))
    with pytest.raises(IDXError, match=r"expected shape \(\*, 28, 28\)"):
        read_idx(p, expect_shape=(None, 28, 28))
    with pytest.raises(IDXError, match="expected 3 dimensions"):
        read_idx(p, expect_ndim=3)
    q = write_idx(tmp_path / "f.idx", np.zeros(4, np.float32))
    with pytest.raises(IDXError, match="expected dtype uint8"):
        read_idx(q, expect_dtype="uint8")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        read_idx(tmp_path / "nope.idx")


@pytest.mark.parametrize("gz", [True, False])
def test_load_from_data_dir_matches_files(tmp_path, gz):
    arrays = make_idx_set(tmp_path / "m", gz=gz)
    ds = load_dataset("mnist", tmp_path / "m")
    assert ds.name == "mnist" and ds.source == str(tmp_path / "m")
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.train_x.dtype == torch.float32
    assert ds.test_y.dtype == torch.int64
    torch.testing.assert_close(ds.train_x[:, 0] * 255, torch.from_numpy(arrays["train_x"]).float())
    assert torch.equal(ds.test_y, torch.from_numpy(arrays["test_y"]).long())
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0


def test_count_mismatch_between_images_and_labels(tmp_path):
    make_idx_set(tmp_path)
    write_idx(tmp_path / (FILES["train_y"] + ".gz"), np.zeros(11, np.uint8))
    with pytest.raises(ValueError, match="12 images but .* has 11 labels"):
        load_dataset("fashion-mnist", tmp_path)


def test_wrong_image_dims_rejected(tmp_path):
    make_idx_set(tmp_path)
    write_idx(tmp_path / (FILES["test_x"] + ".gz"), np.zeros((5, 27, 28), np.uint8))
    with pytest.raises(IDXError, match="t10k-images"):
        load_dataset("mnist", tmp_path)


def test_label_out_of_range_rejected(tmp_path):
    make_idx_set(tmp_path)
    write_idx(tmp_path / (FILES["test_y"] + ".gz"), np.full(5, 10, np.uint8))
    with pytest.raises(ValueError, match="label 10"):
        load_dataset("mnist", tmp_path)


def test_search_order_data_dir_then_env_then_cache(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "cache" / "batchnorm" / "mnist", n_train=3)
    assert len(load_dataset("mnist").train_y) == 3
    make_idx_set(tmp_path / "env" / "MNIST" / "raw", n_train=4)  # torchvision layout
    monkeypatch.setenv("BATCHNORM_DATA", str(tmp_path / "env"))
    assert len(load_dataset("mnist").train_y) == 4
    make_idx_set(tmp_path / "explicit", n_train=5, gz=False)
    assert len(load_dataset("mnist", tmp_path / "explicit").train_y) == 5


def test_fashion_found_in_system_dir(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "usr")
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": (tmp_path / "usr",)})
    assert load_dataset("fashion-mnist").source == str(tmp_path / "usr")
    assert best_available(download_ok=False) == "fashion-mnist"


def test_download_failure_is_fast_and_names_alternatives(tmp_path):
    (tmp_path / "empty").mkdir()  # an existing folder without the files
    t = time.perf_counter()
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", tmp_path / "empty")
    assert time.perf_counter() - t < 5
    msg = str(e.value)
    for alt in (
        "--dataset fashion-mnist",
        "--dataset digits",
        "--data-dir",
        "$BATCHNORM_DATA",
        "offline (test)",
    ):
        assert alt in msg
    assert str(tmp_path / "empty") in msg


def test_hanging_network_hits_the_deadline(monkeypatch):
    def hang(url, timeout=None):
        time.sleep(30)

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    t = time.perf_counter()
    with pytest.raises(DataNotFoundError, match="TimeoutError"):
        sources.download("mnist", timeout=0.01)
    assert time.perf_counter() - t < 5


def test_real_socket_refused_fails_fast(monkeypatch, tmp_path):
    """A closed local port (nothing listens): the real urlopen gives up at once."""
    import importlib
    import socket

    real = importlib.reload(urllib.request).urlopen
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setattr(urllib.request, "urlopen", real)
    monkeypatch.setitem(sources.MIRRORS, "mnist", (f"http://127.0.0.1:{port}/",))
    t = time.perf_counter()
    with pytest.raises(DataNotFoundError, match="127.0.0.1"):
        sources.download("mnist", tmp_path, timeout=2)
    assert time.perf_counter() - t < 5


def test_download_checks_sha256_and_stores_atomically(tmp_path, monkeypatch):
    blobs = {name: gzip.compress(_raw(dims=(1,))) for name in sources.SHA256["mnist"]}
    import hashlib
    import io

    sums = {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}

    def serve(url, timeout=None):
        return io.BytesIO(blobs[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    with pytest.raises(DataNotFoundError, match="does not match"):
        sources.download("mnist", tmp_path / "d")
    assert not any((tmp_path / "d").glob("*.gz"))  # nothing stored when the hash is wrong
    monkeypatch.setitem(sources.SHA256, "mnist", sums)
    d = sources.download("mnist", tmp_path / "d")
    assert sorted(p.name for p in d.iterdir()) == sorted(blobs)


def test_no_download_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHNORM_NO_DOWNLOAD", "1")
    with pytest.raises(DataNotFoundError, match="disabled"):
        load_dataset("mnist")
    assert best_available() == "digits"


def test_digits_is_28x28_deterministic_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_x.shape[1:] == (1, 28, 28) and a.test_x.shape[1:] == (1, 28, 28)
    assert len(a.train_y) + len(a.test_y) == 1797
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    assert 0.0 <= a.train_x.min() and a.train_x.max() <= 1.0
    assert a.train_x[..., :2, :].abs().max() == 0  # the 2-pixel padding
    assert set(a.test_y.tolist()) == set(range(10))
    # no test image is also a training image
    tr = {bytes(x.numpy().tobytes()) for x in a.train_x}
    assert (
        sum(bytes(x.numpy().tobytes()) in tr for x in a.test_x) <= 2
    )  # sklearn has a few duplicates


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="mnist, fashion-mnist, digits"):
        load_dataset("cifar")
