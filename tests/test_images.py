"""Image-folder data without torchvision (batchnorm.research.data.images)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batchnorm.research.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    ImageFolder,
    ImageFolderData,
    ImageFolderError,
    eval_transform,
    make_image_folder,
    multi_crop,
    train_transform,
)
from batchnorm.research.data.sources import DataNotFoundError
from batchnorm.research.engine.sampler import Batches

SIZE = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs") / "tiny", 3, (8, 5), (40, 32))


def _photo(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """A structured RGB image with mid-range values (no clipping under distortion)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 0.5 + 0.15 * np.sin(xx / 3.0)[..., None] * np.array([1.0, 0.5, -0.7])
    base = base + 0.1 * np.cos(yy / 5.0)[..., None] + rng.normal(0, 0.02, (h, w, 3))
    return Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8), "RGB")


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x * std + mean


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- listing --------------------------------------------------------------------------------


def test_listing_is_sorted_with_labels_from_train_class_order(tmp_path):
    for split in ("train", "val"):
        for c in ("zebra", "apple", "mango"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for name in ("b.png", "a.JPEG", "c.webp", "d.Bmp", "e.jpg"):
                Image.new("RGB", (8, 8), (10, 20, 30)).save(d / name, format=_fmt(name))
            (d / "notes.txt").write_text("not an image")
            (d / "._a.jpg").write_bytes(b"macOS resource fork")  # hidden: skipped
        (tmp_path / split / ".cache").mkdir()  # hidden folder: not a class
    f = ImageFolder(tmp_path, "val")
    assert f.classes == ["apple", "mango", "zebra"]
    assert f.class_to_idx == {"apple": 0, "mango": 1, "zebra": 2}
    names = [Path(p).relative_to(tmp_path / "val").as_posix() for p, _ in f.samples]
    files = ["a.JPEG", "b.png", "c.webp", "d.Bmp", "e.jpg"]
    assert names == [f"{c}/{n}" for c in ("apple", "mango", "zebra") for n in files]
    assert f.targets == [0] * 5 + [1] * 5 + [2] * 5 and len(f) == 15
    img, label = f.load(7)
    assert img.mode == "RGB" and img.size == (8, 8) and label == 1


def _fmt(name: str) -> str:
    ext = name.rsplit(".", 1)[1].lower()
    return {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}[ext]


def test_generated_folder_and_data_attributes(folder):
    data = ImageFolderData(folder, image_size=SIZE, workers=0)
    assert data.name == "tiny" and data.source == str(folder.resolve())
    assert data.classes == ["class_00", "class_01", "class_02"] and data.num_classes == 3
    assert data.n_train == 24 and data.n_test == 15
    exts = {Path(p).suffix for p, _ in data.train.samples}
    modes = {Image.open(p).mode for p, _ in data.train.samples}
    assert exts == {".jpg", ".png"} and modes == {"RGB", "L"}


# --- clear errors ---------------------------------------------------------------------------


def test_missing_root_and_splits(tmp_path):
    with pytest.raises(DataNotFoundError, match="nowhere is not a directory"):
        ImageFolderData(tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match=r"has no train/ folder.*ImageNet layout"):
        ImageFolder(tmp_path, "train")
    root = make_image_folder(tmp_path / "r", 2, (1, 1), (8, 8))
    shutil.rmtree(root / "val")
    ImageFolder(root, "train")  # train alone is fine
    with pytest.raises(DataNotFoundError, match=r"r has no val/ folder"):
        ImageFolderData(root, workers=0)


def test_no_classes_mismatched_classes_and_empty_class(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(ImageFolderError, match=r"train has no class folders"):
        ImageFolder(tmp_path, "train")
    root = make_image_folder(tmp_path / "r", 3, (1, 1), (8, 8))
    (root / "val" / "class_01").rename(root / "val" / "class_xx")
    with pytest.raises(ImageFolderError) as e:
        ImageFolder(root, "val")
    msg = str(e.value)
    assert "missing from val/: class_01" in msg and "not in train/: class_xx" in msg
    (root / "val" / "class_xx").rename(root / "val" / "class_01")
    (root / "train" / "class_02" / "img_0000.jpg").rename(root / "train" / "class_02" / "x.txt")
    with pytest.raises(ImageFolderError, match=r"class folder .*train/class_02 holds no images"):
        ImageFolder(root, "train")


def test_corrupt_image_is_named_when_decoded(tmp_path):
    root = make_image_folder(tmp_path / "r", 2, (2, 1), (16, 16))
    bad = root / "train" / "class_01" / "img_0000.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated JPEG: opens, fails to decode
    f = ImageFolder(root, "train")  # listing does not decode
    with pytest.raises(ImageDecodeError, match=f"cannot decode image {bad}"):
        f.load(2)
    bad.write_bytes(b"not an image at all")
    data = ImageFolderData(root, image_size=8, workers=0)
    with pytest.raises(ImageDecodeError, match=str(bad)):
        list(data.train_batches(Batches(4, 4, 0, "t"), 0, 1))
    data.num_workers = 1  # raised in a worker: re-raised here with the same type, file named
    with pytest.raises(ImageDecodeError, match=str(bad)):
        list(data.train_batches(Batches(4, 4, 0, "t"), 0, 1))


# --- transforms -----------------------------------------------------------------------------


def test_train_transform_is_determined_by_the_generator():
    img = _photo()
    a = train_transform(img, SIZE, _g(1), 1.0)
    b = train_transform(img, SIZE, _g(1), 1.0)
    c = train_transform(img, SIZE, _g(2), 1.0)
    assert a.shape == (3, SIZE, SIZE) and a.dtype == torch.float32 and a.is_contiguous()
    assert torch.equal(a, b) and not torch.equal(a, c)
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    for seed in range(8):
        x = train_transform(img, SIZE, _g(seed), 2.0)
        assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5
        u = _unnormalize(x)
        assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5


def test_distortion_changes_colour_only():
    img = _photo()
    for seed in range(6):
        g0, g1 = _g(seed), _g(seed)
        x0 = _unnormalize(train_transform(img, SIZE, g0, 0.0))
        x1 = _unnormalize(train_transform(img, SIZE, g1, 1.0))
        assert torch.equal(g0.get_state(), g1.get_state())  # as many draws at every strength
        assert not torch.allclose(x0, x1, atol=1e-3)
        # Brightness and contrast map luma affinely and saturation keeps it: the same crop and
        # flip make the two lumas affinely related, a different crop would not.
        luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        l0, l1 = (x0 * luma).sum(0).flatten(), (x1 * luma).sum(0).flatten()
        assert torch.corrcoef(torch.stack([l0, l1]))[0, 1] > 0.999
        other = (_unnormalize(train_transform(img, SIZE, _g(seed + 100), 0.0)) * luma).sum(0)
        assert torch.corrcoef(torch.stack([l0, other.flatten()]))[0, 1] < 0.99


def test_grayscale_and_rgba_inputs_become_rgb():
    gray = _photo().convert("L")
    x = _unnormalize(train_transform(gray, SIZE, _g(0), 1.0))
    assert x.shape == (3, SIZE, SIZE)
    assert torch.allclose(x[0], x[1], atol=1e-5) and torch.allclose(x[1], x[2], atol=1e-5)
    rgba = _photo().convert("RGBA")
    assert torch.equal(eval_transform(rgba, SIZE), eval_transform(_photo(), SIZE))
    assert multi_crop(gray, SIZE).shape == (10, 3, SIZE, SIZE)


def test_eval_transform_and_multi_crop():
    for w, h in ((64, 48), (30, 70)):
        img = _photo(w, h)
        e = eval_transform(img, SIZE)
        assert e.shape == (3, SIZE, SIZE) and e.dtype == torch.float32
        assert torch.equal(eval_transform(img, SIZE), e)
        m = multi_crop(img, SIZE)
        assert m.shape == (10, 3, SIZE, SIZE)
        assert torch.equal(m[4], e)  # the center crop is the eval view
        assert torch.equal(m[5:], m[:5].flip(-1))  # then the flips, in the same order
        assert len({tuple(v.flatten()[:50].tolist()) for v in m[:5]}) == 5


# --- the data seam --------------------------------------------------------------------------


def test_train_batches_same_for_any_workers_and_ranks_cover_the_global_batch(folder):
    d0 = ImageFolderData(folder, image_size=SIZE, workers=0)
    d2 = ImageFolderData(folder, image_size=SIZE, workers=2)
    b = Batches(d0.n_train, 8, seed=3, tag="arm")
    state = torch.get_rng_state()
    ref = list(d0.train_batches(b, 0, 5, augment=0.5, tag="arm"))  # 5 steps: 2 epochs
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert len(ref) == 5 and ref[0][0].shape == (8, 3, SIZE, SIZE) and ref[0][1].dtype == torch.long
    targets = torch.tensor(d0.train.targets)
    for t, (_, y) in enumerate(ref):
        assert torch.equal(y, targets[b.indices(t)])
    with2 = list(d2.train_batches(b, 0, 5, augment=0.5, tag="arm"))
    resumed = list(d0.train_batches(b, 3, 5, augment=0.5, tag="arm"))
    for (x, y), (x2, y2) in zip(ref, with2, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    for (x, y), (xr, yr) in zip(ref[3:], resumed, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    r0 = list(d2.train_batches(b, 0, 5, rank=0, world=2, augment=0.5, tag="arm"))
    r1 = list(d0.train_batches(b, 0, 5, rank=1, world=2, augment=0.5, tag="arm"))
    for (x, y), (xa, ya), (xb, yb) in zip(ref, r0, r1, strict=True):
        assert xa.shape[0] == xb.shape[0] == 4
        assert torch.equal(torch.cat([xa, xb]), x) and torch.equal(torch.cat([ya, yb]), y)
    other = next(iter(d0.train_batches(b, 0, 1, augment=0.5, tag="other")))
    assert torch.equal(other[1], ref[0][1]) and not torch.equal(other[0], ref[0][0])


def test_test_batches_over_two_ranks_cover_every_example_once(folder):
    data = ImageFolderData(folder, image_size=SIZE, workers=0)
    full = list(data.test_batches(4))
    assert [len(y) for _, y in full] == [4, 4, 4, 3]
    x, y = torch.cat([a for a, _ in full]), torch.cat([b for _, b in full])
    assert torch.equal(y, torch.tensor(data.val.targets))
    assert torch.equal(x[7], eval_transform(Image.open(data.val.samples[7][0]), SIZE))
    data.num_workers = 2
    shards = [list(data.test_batches(3, rank=r, world=2)) for r in range(2)]
    xs = [torch.cat([a for a, _ in s]) for s in shards]
    ys = [torch.cat([b for _, b in s]) for s in shards]
    assert len(ys[0]) + len(ys[1]) == data.n_test == 15
    assert torch.equal(xs[0], x[0::2]) and torch.equal(xs[1], x[1::2])
    assert torch.equal(ys[0], y[0::2]) and torch.equal(ys[1], y[1::2])


def test_argument_checks(folder):
    data = ImageFolderData(folder, image_size=SIZE, workers=0)
    with pytest.raises(ValueError, match="n=data.n_train"):
        data.train_batches(Batches(10, 4, 0, "t"), 0, 1)
    with pytest.raises(ValueError, match="rank"):
        data.train_batches(Batches(data.n_train, 4, 0, "t"), 0, 1, rank=2, world=2)
    with pytest.raises(ValueError, match="distortion"):
        data.train_batches(Batches(data.n_train, 4, 0, "t"), 0, 1, augment=-1.0)
    with pytest.raises(ValueError, match="workers"):
        ImageFolderData(folder, workers=-1)
