"""The training images, read once each for precompute: the uint8 RGB tensor the crops are cut
from and, optionally, the stage-1 detector's input; decoded by worker processes ahead of use."""
from typing import List, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .embedding_cache import CacheError

__all__ = ["ImageReader", "image_loader", "load_images_list"]


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
