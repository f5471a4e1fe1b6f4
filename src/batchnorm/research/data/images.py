"""Data from a folder of image files (the ImageNet layout), without torchvision.

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` -- ImageNet's train
split as distributed, its val split once sorted into class folders, or Imagenette as unpacked.
The classes are the sorted names of the folders under ``train``; ``val`` must have the same
ones. Each class folder is read flat (no sub-folders), its files with the extensions
:data:`EXTENSIONS` (any case) in sorted order, hidden files (``.*``, e.g. macOS ``._x.JPEG``)
skipped, so the listing and the labels are the same on every machine.

The transforms use Pillow for decoding, cropping and resizing and numpy for the pixel
arithmetic (numpy's reductions give the same bits whatever the number of threads, so a batch
is the same from the main process and from a DataLoader worker). Each random transform draws
from the ``torch.Generator`` it is given, so a crop is a function of its seed alone.

:class:`ImageFolderData` serves both splits through the engine's data seam
(:class:`~batchnorm.research.engine.data.Data`) with a ``torch.utils.data.DataLoader`` and
worker processes. Step ``t``'s mini-batch is ``Batches.indices(t, rank, world)`` and the
example at position ``p`` of the global batch is transformed with the seed
``step_seed(seed, "augment/" + tag, t) * SEED_STRIDE + p``: the same step gives the same
crops whatever the number of workers or of processes sharing the batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..engine.sampler import Batches, step_seed
from .sources import DataNotFoundError

__all__ = [
    "EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SEED_STRIDE",
    "ImageDecodeError",
    "ImageFolder",
    "ImageFolderData",
    "ImageFolderError",
    "distort",
    "eval_transform",
    "load_image",
    "make_image_folder",
    "multi_crop",
    "normalize",
    "to_rgb",
    "train_transform",
]

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = ("train", "val")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Photometric distortion at strength 1: each factor uniform in [1 - 0.4, 1 + 0.4], the
# strengths of torchvision's ColorJitter(0.4, 0.4, 0.4) in the usual ImageNet recipes.
BRIGHTNESS = CONTRAST = SATURATION = 0.4
# Per-example seeds are step_seed(...) * SEED_STRIDE + position: room for 2**20 examples a step.
SEED_STRIDE = 1 << 20
EVAL_RESIZE = 256 / 224  # eval: shorter side to size * 256 / 224, then the central size x size
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as torchvision's grayscale
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)


class ImageFolderError(ValueError):
    """The image folder's layout is not usable; the message names the path and the fix."""


class ImageDecodeError(ImageFolderError):
    """An image file could not be decoded; the message names the file."""


# ---------------------------------------------------------------------------------------------
# The folder listing


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(EXTENSIONS)


def _class_dirs(split_dir: Path) -> list[str]:
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _split_dir(root: Path, split: str) -> Path:
    d = root / split
    if not d.is_dir():
        raise DataNotFoundError(
            f"{root} has no {split}/ folder; an image folder needs {root}/train/<class>/<images> "
            f"and {root}/val/<class>/<images> (the ImageNet layout; sort ImageNet's val images "
            "into one folder per class first)"
        )
    return d


class ImageFolder:
    """The images of one split of ``root``: ``samples[i] = (path, label)``, in a fixed order.

    ``classes`` are the sorted folder names under ``root/train`` (also for ``split="val"``, so
    both splits use the same labels); ``val`` must hold the same class folders. Images are
    listed here and decoded only when :meth:`load` is called.
    """

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(
                f"image folder {root} is not a directory; give the folder holding train/ and "
                "val/ (root/train/<class>/<images>, the ImageNet layout)"
            )
        self.root, self.split = root, split
        train_dir = _split_dir(root, "train")
        classes = _class_dirs(train_dir)
        if not classes:
            raise ImageFolderError(
                f"{train_dir} has no class folders; put each class's images in its own "
                f"sub-folder, {train_dir}/<class>/<images>"
            )
        split_dir = _split_dir(root, split)
        if split != "train":
            have = _class_dirs(split_dir)
            if have != classes:
                missing = sorted(set(classes) - set(have))
                extra = sorted(set(have) - set(classes))
                raise ImageFolderError(
                    f"the class folders of {split_dir} differ from those of {train_dir}: "
                    f"missing from {split}/: {_names(missing)}; not in train/: {_names(extra)}; "
                    f"give {split}/ exactly the class folders of train/"
                )
        self.classes: list[str] = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        samples: list[tuple[str, int]] = []
        for label, c in enumerate(classes):
            d = split_dir / c
            with os.scandir(d) as it:
                files = sorted(e.name for e in it if _is_image(e.name) and e.is_file())
            if not files:
                raise ImageFolderError(
                    f"class folder {d} holds no images ({' '.join(EXTENSIONS)}, any case); add "
                    f"its images, or remove the class from both train/ and val/"
                )
            samples += [(os.path.join(d, f), label) for f in files]
        self.samples = samples
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[Image.Image, int]:
        """Example ``i``: its image, decoded and in RGB, and its label."""
        path, label = self.samples[i]
        return load_image(path), label

    def __repr__(self) -> str:
        return (
            f"ImageFolder({str(self.root)!r}, {self.split!r}, {len(self)} images, "
            f"{len(self.classes)} classes)"
        )


def _names(xs: Sequence[str], most: int = 10) -> str:
    if not xs:
        return "none"
    more = f" and {len(xs) - most} more" if len(xs) > most else ""
    return ", ".join(xs[:most]) + more


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` in RGB mode: grayscale, palette, RGBA (alpha dropped), CMYK ... converted."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns on P -> RGB with transparency
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path``, fully decoded, in RGB; :class:`ImageDecodeError` if it can't be."""
    try:
        with Image.open(path) as f:
            f.load()
            return to_rgb(f) if f.mode != "RGB" else f.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(
            f"cannot decode image {path} ({type(e).__name__}: {e}); replace the file with a "
            "readable copy or delete it"
        ) from None


# ---------------------------------------------------------------------------------------------
# Transforms


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return size


def _to_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    return np.asarray(img, dtype=np.float32) / np.float32(255)


def normalize(x: np.ndarray) -> Tensor:
    """(H, W, 3) float32 in [0, 1] -> (3, H, W) tensor normalized with ImageNet's mean and std."""
    x = (x - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))


def _uniform(g: torch.Generator, n: int) -> list[float]:
    return torch.rand(n, generator=g, dtype=torch.float64).tolist()


def _crop_box(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """Inception-style random-size crop (left, top, right, bottom): area fraction uniform in
    [0.08, 1], aspect ratio log-uniform in [3/4, 4/3]; after 10 misses, the largest central
    crop with the ratio clamped to that range (torchvision's RandomResizedCrop). Always draws
    the same number of random values from ``g``."""
    area = width * height
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    u = _uniform(g, 40)  # 10 tries x (area, ratio, top, left)
    for k in range(10):
        target = area * (0.08 + 0.92 * u[4 * k])
        ratio = math.exp(lo + (hi - lo) * u[4 * k + 1])
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[4 * k + 2] * (height - h + 1)), height - h)
            left = min(int(u[4 * k + 3] * (width - w + 1)), width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def distort(x: np.ndarray, g: torch.Generator, distortion: float = 1.0) -> np.ndarray:
    """Photometric distortion of ``x`` (H, W, 3) float32 in [0, 1], as torchvision's ColorJitter.

    Brightness, contrast and saturation, in an order drawn from ``g``, each with a factor
    uniform in ``[1 - 0.4 d, 1 + 0.4 d]`` (``d = distortion``, factors clipped at 0), the
    result clipped to [0, 1] after each. Brightness scales the pixels; contrast blends with the
    image's mean gray level; saturation blends with each pixel's gray level (luma, so it
    leaves brightness alone). Always draws 6 values from ``g``; ``distortion == 0`` returns
    ``x`` unchanged.
    """
    u = _uniform(g, 6)
    order = np.argsort(u[3:], kind="stable")  # a random permutation of the three operations
    if distortion == 0:
        return x
    f = [
        max(0.0, 1 + s * distortion * (2 * v - 1))
        for s, v in zip((BRIGHTNESS, CONTRAST, SATURATION), u[:3], strict=True)
    ]
    for op in order:
        a = np.float32(f[op])
        if op == 0:
            x = x * a
        elif op == 1:
            m = np.float32((x @ _LUMA).mean(dtype=np.float64))
            x = (x - m) * a + m
        else:
            gray = (x @ _LUMA)[..., None]
            x = (x - gray) * a + gray
        x = np.clip(x, 0, 1, out=x)
    return x


def _check_distortion(distortion: float) -> float:
    if (
        isinstance(distortion, bool)
        or not isinstance(distortion, int | float)
        or not math.isfinite(distortion)
        or distortion < 0
    ):
        raise ValueError(f"distortion must be a finite number >= 0, got {distortion!r}")
    return float(distortion)


def train_transform(
    img: Image.Image, size: int, g: torch.Generator, distortion: float = 1.0
) -> Tensor:
    """The training view of ``img``: a (3, size, size) float32 tensor, ImageNet-normalized.

    Inception-style random-size crop (:func:`_crop_box`), bilinear resize to size x size,
    horizontal flip with probability 1/2, then :func:`distort` at strength ``distortion``
    (0: none; 1: brightness, contrast and saturation each ±0.4; the paper's BN-x5 recipe
    used "lighter photometric distortions", e.g. 0.5). Every random value comes from ``g``,
    and as many are drawn whatever ``distortion`` is, so the same seed gives the same crop and
    flip at every strength.
    """
    size = _check_size(size)
    distortion = _check_distortion(distortion)
    img = to_rgb(img)
    box = _crop_box(img.width, img.height, g)
    flip = _uniform(g, 1)[0] < 0.5
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return normalize(distort(_to_array(out), g, distortion))


def _resize_shorter(img: Image.Image, size: int) -> Image.Image:
    short = max(size, round(size * EVAL_RESIZE))
    w, h = img.size
    if w <= h:
        new = (short, max(short, round(h * short / w)))
    else:
        new = (max(short, round(w * short / h)), short)
    return img.resize(new, Image.Resampling.BILINEAR)


def _crop(img: Image.Image, left: int, top: int, size: int) -> Image.Image:
    return img.crop((left, top, left + size, top + size))


def eval_transform(img: Image.Image, size: int) -> Tensor:
    """The evaluation view of ``img``: shorter side resized (bilinear) to
    ``round(size * 256 / 224)``, the central size x size crop; (3, size, size), normalized."""
    size = _check_size(size)
    r = _resize_shorter(to_rgb(img), size)
    left, top = round((r.width - size) / 2), round((r.height - size) / 2)
    return normalize(_to_array(_crop(r, left, top, size)))


def multi_crop(img: Image.Image, size: int) -> Tensor:
    """Ten views for multi-crop evaluation: (10, 3, size, size).

    Of the image resized as in :func:`eval_transform`: the top-left, top-right, bottom-left and
    bottom-right corners and the center (index 4, equal to :func:`eval_transform`), then the
    horizontal flips of those five in the same order (as torchvision's ``TenCrop``). Average
    the model's outputs over the first dimension.
    """
    size = _check_size(size)
    r = _resize_shorter(to_rgb(img), size)
    w, h = r.size
    corners = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size)]
    center = (round((w - size) / 2), round((h - size) / 2))
    crops = [_crop(r, left, top, size) for left, top in [*corners, center]]
    crops += [c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for c in crops]
    return torch.stack([normalize(_to_array(c)) for c in crops])


# ---------------------------------------------------------------------------------------------
# The engine's data seam


class _TrainSet(Dataset):
    """Items are ``(index, seed)`` pairs: example ``index`` under ``train_transform`` seeded
    with ``seed``."""

    def __init__(self, folder: ImageFolder, size: int, distortion: float) -> None:
        self.folder, self.size, self.distortion = folder, size, distortion

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int]:
        i, seed = item
        img, label = self.folder.load(i)
        g = torch.Generator().manual_seed(seed)
        return train_transform(img, self.size, g, self.distortion), label


class _EvalSet(Dataset):
    def __init__(self, folder: ImageFolder, size: int) -> None:
        self.folder, self.size = folder, size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, label = self.folder.load(i)
        return eval_transform(img, self.size), label


class _StepSampler:
    """Per step ``start..stop-1``: this rank's share of the global batch as (index, seed)."""

    def __init__(
        self, batches: Batches, start: int, stop: int, rank: int, world: int, tag: str
    ) -> None:
        self.batches, self.start, self.stop = batches, start, stop
        self.rank, self.world, self.tag = rank, world, tag

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.batches
        share = b.batch_size // self.world
        for step in range(self.start, self.stop):
            idx = b.indices(step, self.rank, self.world).tolist()
            base = step_seed(b.seed, "augment/" + self.tag, step) * SEED_STRIDE
            first = self.rank * share  # position of this share in the global batch
            yield [(i, (base + first + j) % 2**63) for j, i in enumerate(idx)]


def _drain(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    it = iter(loader)
    try:
        yield from it
    finally:
        # Stop the workers now when the consumer stops early, not whenever `it` is collected.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class ImageFolderData:
    """An image folder (:class:`ImageFolder`'s layout) as the engine's ``Data``.

    ``name`` is the folder's name, ``source`` its absolute path. Images are decoded and
    transformed in ``workers`` DataLoader worker processes (default ``min(8, cpu_count)``; 0:
    in this process). Training views: :func:`train_transform` at ``image_size``; test views:
    :func:`eval_transform`.
    """

    def __init__(
        self, root: str | os.PathLike, image_size: int = 224, workers: int | None = None
    ) -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(
                f"image folder {root} is not a directory; give the folder holding train/ and "
                "val/ (root/train/<class>/<images>, the ImageNet layout)"
            )
        self.image_size = _check_size(image_size)
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        self.num_workers = workers
        self.source = str(path.resolve())
        self.name = Path(self.source).name
        self.train = ImageFolder(path, "train")
        self.val = ImageFolder(path, "val")
        self.classes = self.train.classes
        self.num_classes = len(self.classes)
        self.n_train = len(self.train)
        self.n_test = len(self.val)

    def _loader(self, dataset: Dataset, batch_sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            # A private generator for the workers' base seed, so iterating leaves the global
            # torch RNG alone (no transform uses that seed: each example has its own).
            generator=torch.Generator().manual_seed(0),
        )

    def train_batches(
        self,
        batches: Batches,
        start: int,
        stop: int,
        *,
        rank: int = 0,
        world: int = 1,
        augment: float | None = None,
        tag: str = "",
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) of steps ``start..stop-1``: this rank's share ``batches.indices(step, rank,
        world)`` of each global mini-batch, x (share, 3, size, size) float32, y int64.

        ``augment``: the photometric distortion strength (None: 1.0; 0: crops and flips only).
        The example at position ``p`` of step ``t``'s global batch is seeded with
        ``step_seed(batches.seed, "augment/" + tag, t) * SEED_STRIDE + p`` (mod 2**63).
        """
        if batches.n != self.n_train:
            raise ValueError(
                f"the sampler draws from {batches.n} examples but {self.source}/train has "
                f"{self.n_train}; build Batches with n=data.n_train"
            )
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        if batches.batch_size >= SEED_STRIDE:
            raise ValueError(f"batch_size must be < {SEED_STRIDE}, got {batches.batch_size}")
        distortion = _check_distortion(1.0 if augment is None else augment)
        dataset = _TrainSet(self.train, self.image_size, distortion)
        sampler = _StepSampler(batches, start, stop, rank, world, tag)
        return _drain(self._loader(dataset, sampler))

    def test_batches(
        self, batch_size: int, *, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The val split under :func:`eval_transform`, in order, ``batch_size`` at a time.

        With ``world > 1`` rank ``r`` takes examples ``r, r + world, r + 2 world, ...``: the
        ranks' shares are disjoint and together hold every example exactly once, so sums of
        losses and correct counts over the ranks (an all-reduce) are the whole split's.
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        mine = list(range(rank, self.n_test, world))
        chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        return _drain(self._loader(_EvalSet(self.val, self.image_size), chunks))

    def __repr__(self) -> str:
        return (
            f"ImageFolderData({self.source!r}, train={self.n_train}, test={self.n_test}, "
            f"classes={self.num_classes}, image_size={self.image_size})"
        )


# ---------------------------------------------------------------------------------------------
# A generated folder for tests and demos


def make_image_folder(
    root: str | os.PathLike,
    classes: int = 3,
    per_class: tuple[int, int] = (8, 4),
    size: tuple[int, int] = (48, 40),
    seed: int = 0,
) -> Path:
    """Write a small image folder in :class:`ImageFolder`'s layout and return its path.

    ``classes`` classes (folders ``class_00``, ``class_01``, ...), ``per_class = (train, val)``
    images each, ``size = (width, height)``. Class ``k`` has its own hue and stripe direction
    and frequency, with per-image phase, shade and noise, so a small net can learn them.
    Images alternate between JPEG and PNG, and every third image is grayscale.
    """
    if classes < 1 or min(per_class) < 1:
        raise ValueError(f"need classes >= 1 and per_class >= (1, 1), got {classes}, {per_class}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for split, n in zip(SPLITS, per_class, strict=True):
        for k in range(classes):
            d = root / split / f"class_{k:02d}"
            d.mkdir(parents=True, exist_ok=True)
            angle = math.pi * k / classes
            freq = 2 * math.pi * (2 + k % 3) / max(w, h)
            hue = np.array(
                [0.5 + 0.5 * math.cos(2 * math.pi * (k / classes + j / 3)) for j in range(3)],
                dtype=np.float32,
            )
            for i in range(n):
                phase = rng.uniform(0, 2 * math.pi)
                t = xx * math.cos(angle) + yy * math.sin(angle)
                stripes = 0.5 + 0.5 * np.sin(freq * t + phase)
                shade = rng.uniform(0.6, 1.0)
                img = shade * (0.35 + 0.65 * stripes[..., None] * hue)
                img = img + rng.normal(0, 0.05, img.shape)
                pixels = (np.clip(img, 0, 1) * 255).astype(np.uint8)
                im = Image.fromarray(pixels, "RGB")
                if i % 3 == 2:
                    im = im.convert("L")
                if i % 2 == 0:
                    im.save(d / f"img_{i:04d}.jpg", quality=90)
                else:
                    im.save(d / f"img_{i:04d}.png")
    return root
