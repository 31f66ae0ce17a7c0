"""The training images, read once each for precompute: the uint8 RGB tensor the crops are cut
from and, optionally, the stage-1 detector's input; decoded by worker processes ahead of use."""
import os
from typing import List, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..utils import UserError
from .embedding_cache import CacheError

__all__ = ["ImageReadError", "ImageReader", "image_loader", "load_images_list"]


class ImageReadError(UserError, OSError):
    """An image file that is missing or does not decode."""


def load_images_list(names: Sequence[str]) -> List[dict]:
    """The dataset dicts of ``names``, concatenated in order: the global order of the cache."""
    dicts = [d for name in names for d in DatasetCatalog.get(name)]
    seen = set()
    for d in dicts:
        image_id = str(d["image_id"])
        if image_id in seen:
            raise CacheError(
                f"image id '{image_id}' occurs twice in {list(names)}; the cache is keyed by image "
                "id, so precompute datasets without shared images"
            )
        seen.add(image_id)
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:  # before any work, not when a worker reaches the file
        raise ImageReadError(
            f"{len(missing)} of the {len(dicts)} images of {list(names)} are missing, e.g. {missing[0]}; "
            "restore them or take them out of the dataset (tools/check_dataset.py lists every problem)"
        )
    return dicts


class ImageReader:
    """Reads an image once: the uint8 RGB tensor [3, H, W] for the crops and, optionally, the
    stage-1 input (the model's pixel format at the test-time resize, as DatasetMapper makes it)."""

    def __init__(self, cfg=None):
        self.format = cfg.INPUT.FORMAT if cfg is not None else None
        self.augmentations = (
            T.AugmentationList(utils.build_augmentation(cfg, is_train=False))
            if cfg is not None
            else None
        )

    def __call__(self, d: dict) -> dict:
        try:
            return self._read(d)
        except (OSError, utils.SizeMismatchError) as e:
            raise ImageReadError(
                f"image {d['file_name']} does not read ({type(e).__name__}: {e}); replace it or take it "
                "out of the dataset (tools/check_dataset.py lists every such file)"
            ) from None

    def _read(self, d: dict) -> dict:
        fmt = self.format if self.format in ("RGB", "BGR") else "RGB"
        image = utils.read_image(d["file_name"], format=fmt)
        utils.check_image_size(d, image)
        rgb = image[:, :, ::-1] if fmt == "BGR" else image
        out = {
            "image_id": str(d["image_id"]),
            "rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
        }
        if self.augmentations is not None:
            if fmt != self.format:
                image = utils.read_image(d["file_name"], format=self.format)
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            out["stage1"] = {
                "image": torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))),
                "height": image.shape[0],
                "width": image.shape[1],
            }
        return out


class _ReadDataset(torch.utils.data.Dataset):
    def __init__(self, dicts: Sequence[dict], reader: ImageReader):
        self.dicts, self.reader = dicts, reader

    def __len__(self):
        return len(self.dicts)

    def __getitem__(self, i):
        return self.reader(self.dicts[i])


def _single(batch):
    return batch[0]


def image_loader(dicts: Sequence[dict], reader: ImageReader, num_workers: int, pin: bool = False):
    """Images in order, decoded by ``num_workers`` processes ahead of the consumer."""
    return torch.utils.data.DataLoader(
        _ReadDataset(dicts, reader),
        batch_size=1,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_single,
        pin_memory=pin,
        prefetch_factor=4 if num_workers else None,
    )
