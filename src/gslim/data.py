"""Datasets: Fashion-MNIST from its idx files, ImageFolder, and synthetic data for tests.

All three produce normalised 3-channel float images at the recipe's input size and are
deterministic under a seed. Fashion-MNIST is decoded, resized and normalised once into
one tensor (60k x 1 x S x S floats): per-item work is then only the augmentation, which
keeps 2-core machines busy with the model rather than the loader.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from gslim.errors import GslimError
from gslim.recipe import DataConfig

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_INSTALL_HINT = "install it with: sudo apt-get install dataset-fashion-mnist"


def _open_idx(root: Path, stem: str) -> bytes:
    for name, opener in ((stem, open), (stem + ".gz", gzip.open)):
        p = root / name
        if p.is_file():
            try:
                with opener(p, "rb") as fh:
                    return fh.read()
            except (OSError, EOFError) as exc:
                raise GslimError(f"cannot read {p}: {exc}") from exc
    raise GslimError(f"Fashion-MNIST file {stem}(.gz) not found in {root}; {FASHION_MNIST_INSTALL_HINT}")


def read_idx(raw: bytes, source: str, expect_count: int, expect_ndim: int) -> torch.Tensor:
    """Parse an idx file (the MNIST format): magic, dims, then unsigned bytes."""
    if len(raw) < 8:
        raise GslimError(f"{source} is too short to be an idx file ({len(raw)} bytes)")
    zero, dtype, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype != 0x08 or ndim != expect_ndim:
        raise GslimError(f"{source} is not an idx file of unsigned bytes with {expect_ndim} dimension(s)")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    if dims[0] != expect_count:
        raise GslimError(f"{source} holds {dims[0]} items, expected {expect_count} (wrong or truncated file)")
    n = 1
    for d in dims:
        n *= d
    body = raw[4 + 4 * ndim :]
    if len(body) != n:
        raise GslimError(f"{source} has {len(body)} data bytes, expected {n} (truncated or wrong size)")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


class TensorImageDataset(Dataset):
    """Pre-normalised images (N, C, S, S) with labels, optional light augmentation.

    Single-channel data is expanded to 3 channels lazily (a view, no copy).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        train: bool,
        seed: int = 0,
        resize_to: Optional[int] = None,
    ):
        self.images, self.labels, self.train = images, labels, train
        self.resize_to = resize_to  # raw uint8 images, decoded and resized per item (large inputs)
        self.size = resize_to or images.shape[-1]
        self.pad = max(1, self.size // 16)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.resize_to is not None:
            x = _normalise_fashion(x.unsqueeze(0), self.resize_to)[0]
        if self.train:
            # random crop with padding and horizontal flip: cheap, and what small-image recipes use
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            p = self.pad
            x = F.pad(x, (p, p, p, p), mode="reflect")
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[:, dy : dy + self.size, dx : dx + self.size]
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x.contiguous(), int(self.labels[i])


def load_fashion_mnist(root: str | Path, split: str, input_size: int, limit: Optional[int] = None) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise GslimError(f"Fashion-MNIST directory not found: {root}; {FASHION_MNIST_INSTALL_HINT}")
    img_stem, lbl_stem, count = FASHION_MNIST_FILES[split]
    images = read_idx(_open_idx(root, img_stem), str(root / img_stem), count, 3)
    labels = read_idx(_open_idx(root, lbl_stem), str(root / lbl_stem), count, 1).long()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = images.unsqueeze(1)
    if input_size <= 64:  # small: decode once (60k x 64 x 64 floats is 1 GB); larger sizes resize per item
        x = _normalise_fashion(x, input_size)
        return TensorImageDataset(x.contiguous(), labels, train=(split == "train"))
    return TensorImageDataset(x, labels, train=(split == "train"), resize_to=input_size)


def _normalise_fashion(x: torch.Tensor, input_size: int) -> torch.Tensor:
    x = x.float().div_(255.0)
    if input_size != x.shape[-1]:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


def make_synthetic(n: int, num_classes: int, input_size: int, seed: int, train: bool) -> Dataset:
    """Learnable synthetic images: each class is a fixed smooth pattern plus noise."""
    g = torch.Generator().manual_seed(1234)  # class patterns are shared by train and val
    base = torch.randn(num_classes, 3, 4, 4, generator=g)
    patterns = F.interpolate(base, size=(input_size, input_size), mode="bilinear", align_corners=False)
    gs = torch.Generator().manual_seed(seed + (0 if train else 10_000))
    labels = torch.randint(0, num_classes, (n,), generator=gs)
    x = patterns[labels] + 0.8 * torch.randn(n, 3, input_size, input_size, generator=gs)
    return TensorImageDataset(x, labels, train=False)


def _imagefolder(root: Path, split: str, input_size: int) -> Dataset:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    d = root / split
    if not d.is_dir():
        raise GslimError(f"ImageFolder split directory not found: {d} (expected {root}/train and {root}/val)")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if split == "train":
        tf = T.Compose([T.RandomResizedCrop(input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    else:
        tf = T.Compose(
            [T.Resize(int(round(input_size / 0.875))), T.CenterCrop(input_size), T.ToTensor(), norm]
        )
    try:
        ds = ImageFolder(str(d), transform=tf, loader=_checked_loader)
    except (FileNotFoundError, RuntimeError) as exc:
        raise GslimError(f"{d}: {str(exc).splitlines()[0]}") from exc
    empty = [c for c in ds.classes if not any(t == ds.class_to_idx[c] for _, t in ds.samples)]
    if empty:
        raise GslimError(f"{d}: class folder(s) with no images: {', '.join(empty[:5])}")
    return ds


def _checked_loader(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        raise GslimError(f"unreadable image {path}: not a valid image file (remove or replace it)") from exc
    except OSError as exc:  # truncated image data, permissions, I/O errors
        raise GslimError(f"unreadable image {path}: {exc.strerror or exc} (remove or replace it)") from exc


def make_dataset(cfg: DataConfig, split: str, input_size: int, num_classes: int, seed: int = 0) -> Dataset:
    """The recipe's dataset for ``split`` ('train' or 'val')."""
    limit = cfg.train_images if split == "train" else cfg.val_images
    if cfg.kind == "fashion-mnist":
        ds = load_fashion_mnist(cfg.resolved_root(), split, input_size, limit)
    elif cfg.kind == "synthetic":
        n = cfg.synthetic_train if split == "train" else cfg.synthetic_val
        ds = make_synthetic(
            n if limit is None else min(n, limit), num_classes, input_size, seed, split == "train"
        )
    else:
        if cfg.root is None:
            raise GslimError("data.root is required for kind 'imagefolder'")
        ds = _imagefolder(Path(cfg.root), split, input_size)
        if limit is not None:
            ds = Subset(ds, _seeded_perm(len(ds), seed)[:limit].tolist())
    if len(ds) == 0:
        raise GslimError(f"the {split} split of the {cfg.kind} dataset is empty")
    return ds


def data_classes(cfg: DataConfig, ds: Dataset) -> Optional[int]:
    """How many classes the dataset's labels come from, where the data fixes it: 10 for
    Fashion-MNIST, the class folders of an image folder; None for synthetic data (made for the
    model's count)."""
    if cfg.kind == "fashion-mnist":
        return 10
    while isinstance(ds, Subset):
        ds = ds.dataset
    classes = getattr(ds, "classes", None)
    return len(classes) if classes is not None else None


def seeded_perm(n: int, seed: int) -> torch.Tensor:
    """The seeded permutation of a split's indices that the calibration subset (and the
    fine-tuning hold-out, :mod:`gslim.holdout`) are drawn from."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


_seeded_perm = seeded_perm


def eval_view(ds: Dataset) -> Dataset:
    """The same images without training augmentation (for calibration and scoring)."""
    if isinstance(ds, TensorImageDataset):
        return TensorImageDataset(ds.images, ds.labels, train=False, resize_to=ds.resize_to)
    if isinstance(ds, Subset):
        return Subset(eval_view(ds.dataset), ds.indices)
    if hasattr(ds, "transform") and hasattr(ds, "root"):  # ImageFolder: swap in the val transform
        import copy

        import torchvision.transforms as T

        size = None
        for t in getattr(ds.transform, "transforms", []):
            if isinstance(t, T.RandomResizedCrop):
                size = t.size[0]
        if size is not None:
            ds = copy.copy(ds)
            ds.transform = T.Compose(
                [
                    T.Resize(int(round(size / 0.875))),
                    T.CenterCrop(size),
                    T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                ]
            )
    return ds


def make_loader(
    ds: Dataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int = 0,
    sampler=None,
    drop_last: bool = False,
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    in_memory = isinstance(ds, TensorImageDataset) or (
        isinstance(ds, Subset) and isinstance(ds.dataset, TensorImageDataset)
    )
    # In-memory tensors gain nothing from worker processes and pay their start-up cost.
    nw = 0 if in_memory else workers
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=nw,
        generator=g,
        drop_last=drop_last,
        persistent_workers=nw > 0,
    )


def calibration_loader(
    cfg: DataConfig,
    input_size: int,
    num_classes: int,
    seed: int = 0,
    batch_size: Optional[int] = None,
    count: Optional[int] = None,
) -> DataLoader:
    """``calib_images`` training images (a seeded random subset), without augmentation, fixed order."""
    ds = eval_view(make_dataset(cfg, "train", input_size, num_classes, seed))
    n = count or cfg.calib_images
    if n > len(ds):
        raise GslimError(f"data.calib_images={n} is larger than the training set ({len(ds)} images)")
    idx = _seeded_perm(len(ds), seed)[:n].tolist()
    return make_loader(Subset(ds, idx), batch_size or cfg.batch_size, shuffle=False, workers=cfg.workers)


def calibration_batch(
    cfg: DataConfig, input_size: int, num_classes: int, seed: int = 0, count: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration set as one (images, labels) pair of tensors."""
    xs, ys = [], []
    for x, y in calibration_loader(cfg, input_size, num_classes, seed, count=count):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
