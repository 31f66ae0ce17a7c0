"""The embedded world: a procedurally generated open-vocabulary detection dataset in VOC format.

Classes are colour x shape ("red circle", ...). Images hold 1 to ``max_objects`` class objects
over a textured background, together with distractor objects of no class, which are drawn but
not annotated. The tree holds four image sets: "trainval" and "test" for the detector, and
"teacher" / "teacher_val", disjoint from both, used only to train and validate a CLIP teacher.

Every image is a pure function of (seed, image set, index), so a tree is reproducible byte for
byte. :func:`ensure_world` builds a tree once and reuses it while its manifest matches.
"""

import json
import logging
import multiprocessing
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..data.datasets.builtin import datasets_root
from ..data.splits import OVDSplit, SplitError, load_split, save_split
from ..utils import UserError, file_damage, file_record
from .render import COLOURS, SHAPES, SceneObject, render_scene

logger = logging.getLogger(__name__)

# Bump whenever a change to drawing or layout changes the bytes written for a config.
GENERATOR_VERSION = 1
CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
DEFAULT_SPLIT = "shapes_ovd_12_4"
CUSTOM_SPLIT_NAME = "shapes_ovd_custom"
IMAGE_SETS = ("trainval", "test", "teacher", "teacher_val")
VOC_FOLDER = "shapes_ovd"
MANIFEST = "manifest.json"

__all__ = [
    "CLASS_NAMES",
    "GENERATOR_VERSION",
    "IMAGE_SETS",
    "WorldConfig",
    "WorldError",
    "check_attribute_coverage",
    "default_world_dir",
    "ensure_world",
    "generate_world",
    "is_complete",
    "make_split",
    "parse_class_list",
    "render_image",
    "save_preview",
]


class WorldError(UserError, ValueError):
    """A world configuration or output folder that cannot be used."""


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the bytes of a generated tree."""

    seed: int = 0
    num_trainval: int = 800
    num_test: int = 200
    num_teacher: int = 1200
    num_teacher_val: int = 300
    image_size: int = 160
    max_objects: int = 6  # class objects per image, at least one
    max_distractors: int = 4
    min_scale: float = 0.1  # object size as a fraction of the image side
    max_scale: float = 0.6
    max_iou: float = 0.3  # largest box IoU between two objects of one image
    jpeg_quality: int = 95

    def counts(self) -> Dict[str, int]:
        return {
            "trainval": self.num_trainval,
            "test": self.num_test,
            "teacher": self.num_teacher,
            "teacher_val": self.num_teacher_val,
        }

    def validate(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise WorldError(f"seed must be a non-negative integer, got {self.seed}")
        for image_set, n in self.counts().items():
            allowed = "0 or at least 2" if image_set.startswith("teacher") else "at least 2"
            if n < 0 or n == 1 or (n == 0 and not image_set.startswith("teacher")):
                raise WorldError(
                    f"num_{image_set} must be {allowed}, got {n} "
                    "(detectron2's VOC loader cannot read a one-line image list)"
                )
        if not 32 <= self.image_size <= 2048:
            raise WorldError(f"image_size must be in [32, 2048] pixels, got {self.image_size}")
        if not 1 <= self.max_objects <= 20:
            raise WorldError(f"max_objects must be in [1, 20], got {self.max_objects}")
        if not 0 <= self.max_distractors <= 20:
            raise WorldError(f"max_distractors must be in [0, 20], got {self.max_distractors}")
        if not 0 < self.min_scale <= self.max_scale <= 0.9:
            raise WorldError(
                f"need 0 < min_scale <= max_scale <= 0.9, got {self.min_scale}, {self.max_scale}"
            )
        if not 0 < self.max_iou <= 1:
            raise WorldError(f"max_iou must be in (0, 1], got {self.max_iou}")
        if not 1 <= self.jpeg_quality <= 100:
            raise WorldError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


def default_world_dir() -> str:
    """``$DETECTRON2_DATASETS/shapes_ovd``, where the built-in registration looks."""
    return os.path.join(datasets_root(), "shapes_ovd")


# ---------------------------------------------------------------------------- splits


def parse_class(name: str) -> Tuple[str, str]:
    """("red", "circle") from "red circle"; SplitError for a name outside the world."""
    parts = name.split(" ")
    if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
        raise SplitError(
            f"class '{name}' is not '<colour> <shape>' with colour in {list(COLOURS)} "
            f"and shape in {list(SHAPES)}"
        )
    return parts[0], parts[1]


def parse_class_list(text: str) -> List[str]:
    """Class names from a comma-separated string, e.g. "red circle, blue star"."""
    return [" ".join(c.split()) for c in text.split(",") if c.strip()]


def check_attribute_coverage(split: OVDSplit) -> None:
    """Raise SplitError unless each novel class's colour and shape both appear in a base class.

    Without that, a novel class would name an attribute the detector never saw in training.
    """
    for name in split.classes:
        parse_class(name)
    base = [parse_class(c) for c in split.base_classes]
    base_colours, base_shapes = {c for c, _ in base}, {s for _, s in base}
    for name in split.novel_classes:
        colour, shape = parse_class(name)
        for kind, value, seen in (("colour", colour, base_colours), ("shape", shape, base_shapes)):
            if value not in seen:
                raise SplitError(
                    f"split '{split.name}': novel class '{name}' has {kind} '{value}', which no "
                    f"base class has; keep at least one '{value}' class base"
                )


def make_split(novel_classes: Optional[Sequence[str]] = None) -> OVDSplit:
    """The default 12/4 split, or the world's classes with ``novel_classes`` as novel."""
    default = load_split(DEFAULT_SPLIT)
    if list(default.classes) != list(CLASS_NAMES):
        raise SplitError(f"split '{DEFAULT_SPLIT}' does not list the world's classes {CLASS_NAMES}")
    if novel_classes is None:
        split = default
    else:
        novel = (
            parse_class_list(novel_classes)
            if isinstance(novel_classes, str)
            else list(novel_classes)
        )
        for name in novel:
            parse_class(name)
        if not novel:
            raise SplitError("give at least one novel class")
        if set(novel) == set(default.novel_classes):
            split = default
        else:
            ordered = [c for c in CLASS_NAMES if c in set(novel)]
            split = default.with_novel(ordered, name=CUSTOM_SPLIT_NAME)
    check_attribute_coverage(split)
    return split


# ---------------------------------------------------------------------------- images


def image_id(image_set: str, index: int) -> str:
    return f"{image_set}_{index:06d}"


def image_index(file_id: str) -> int:
    """The index in its image set of the image named ``file_id`` (see ``image_id``)."""
    return int(file_id.rsplit("_", 1)[-1])


def render_image(
    cfg: WorldConfig, image_set: str, index: int
) -> Tuple[np.ndarray, List[SceneObject]]:
    """Image ``index`` of ``image_set``: uint8 RGB array and all its objects (distractors too)."""
    rng = np.random.default_rng([cfg.seed, IMAGE_SETS.index(image_set), index])
    return render_scene(
        rng,
        cfg.image_size,
        max_objects=cfg.max_objects,
        max_distractors=cfg.max_distractors,
        min_scale=cfg.min_scale,
        max_scale=cfg.max_scale,
        max_iou=cfg.max_iou,
    )


def annotation_xml(file_id: str, image_size: int, objects: Sequence[SceneObject]) -> bytes:
    """A VOC annotation of the class objects; distractors are left out."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = VOC_FOLDER
    ET.SubElement(root, "filename").text = f"{file_id}.jpg"
    size = ET.SubElement(root, "size")
    for key, value in (("width", image_size), ("height", image_size), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        if obj.class_name is None:
            continue
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj.class_name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(obj.truncated))
        ET.SubElement(node, "difficult").text = "0"
        box = ET.SubElement(node, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def _write_image(root: str, cfg: WorldConfig, image_set: str, index: int) -> List[str]:
    """Writes one image and its annotation; returns the names of its class objects."""
    file_id = image_id(image_set, index)
    image, objects = render_image(cfg, image_set, index)
    Image.fromarray(image).save(
        os.path.join(root, "JPEGImages", f"{file_id}.jpg"),
        format="JPEG",
        quality=cfg.jpeg_quality,
        subsampling=0,  # 4:4:4: chroma subsampling smears the colours of small objects
    )
    with open(os.path.join(root, "Annotations", f"{file_id}.xml"), "wb") as f:
        f.write(annotation_xml(file_id, cfg.image_size, objects))
    return [o.class_name for o in objects if o.class_name is not None]


def _write_task(task) -> Tuple[str, List[str]]:
    root, cfg, image_set, index = task
    return image_set, _write_image(root, cfg, image_set, index)


def _map_tasks(tasks, workers: int):
    if workers <= 1 or len(tasks) < 64 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(_write_task, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap_unordered(_write_task, tasks, chunksize=16)


def generate_world(
    root: str,
    cfg: WorldConfig,
    split: OVDSplit,
    progress: bool = True,
    workers: Optional[int] = None,
) -> None:
    """Writes the whole tree into ``root`` (not atomic; :func:`ensure_world` wraps it)."""
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    tasks = [(root, cfg, s, i) for s, n in cfg.counts().items() for i in range(n)]
    workers = workers or min(8, os.cpu_count() or 1)
    instances = {s: {c: 0 for c in CLASS_NAMES} for s in IMAGE_SETS}
    bar = tqdm(
        total=len(tasks), desc="shapes_ovd", unit="img", file=sys.stderr, disable=not progress
    )
    with bar:
        for image_set, names in _map_tasks(tasks, workers):
            for name in names:
                instances[image_set][name] += 1
            bar.update(1)
    for image_set, n in cfg.counts().items():
        with open(os.path.join(root, "ImageSets", "Main", f"{image_set}.txt"), "w") as f:
            f.writelines(f"{image_id(image_set, i)}\n" for i in range(n))
    save_split(split, os.path.join(root, "split.json"))
    # The manifest goes last: its presence marks the tree complete; it records every file's size
    # and sha256, so that a damaged tree is generated again
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, root)] = file_record(path)
    manifest = dict(_manifest_key(cfg, split), image_sets=cfg.counts(), instances=instances,
                    files=dict(sorted(files.items())))
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------- on-disk tree


def _manifest_key(cfg: WorldConfig, split: OVDSplit) -> dict:
    return {"generator_version": GENERATOR_VERSION, "config": asdict(cfg), "split": split.to_dict()}


def read_manifest(root: str) -> Optional[dict]:
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def world_damage(root: str, manifest: dict) -> Optional[str]:
    """The first file of a finished tree that is not as written ("<file> is missing"), or None."""
    for rel, record in manifest.get("files", {}).items():
        why = file_damage(os.path.join(root, rel), record)
        if why:
            return f"{os.path.join(root, rel)} {why}"
    return None


def is_complete(root: str, cfg: WorldConfig, split: OVDSplit) -> bool:
    """Whether ``root`` holds a finished tree generated from exactly this config and split, every
    file as it was written."""
    manifest = read_manifest(root)
    if manifest is None or any(manifest.get(k) != v for k, v in _manifest_key(cfg, split).items()):
        return False
    damaged = world_damage(root, manifest)
    if damaged:
        logger.warning(f"world {damaged}: generating it again")
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_siblings(root: str) -> None:
    """Deletes temporary trees left by generator runs that were killed."""
    parent, base = os.path.split(root)
    for entry in os.listdir(parent or "."):
        for marker in (".tmp-", ".old-"):
            prefix = base + marker
            pid = entry[len(prefix) :]
            if entry.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _check_replaceable(root: str) -> None:
    if os.path.exists(root) and not os.path.isdir(root):
        raise WorldError(f"{root} exists and is not a folder; choose another output folder")
    if os.path.isdir(root) and os.listdir(root) and read_manifest(root) is None:
        raise WorldError(
            f"{root} exists and is not a generated world (no {MANIFEST}); "
            "remove it or choose another output folder"
        )


def _swap_in(tmp: str, root: str, cfg: WorldConfig, split: OVDSplit) -> None:
    old = f"{root}.old-{os.getpid()}"
    if os.path.exists(root):
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process put its tree in place meanwhile; keep it if it is the same world.
        if not is_complete(root, cfg, split):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def ensure_world(
    output_dir: str,
    cfg: Optional[WorldConfig] = None,
    novel_classes: Optional[Sequence[str]] = None,
    progress: bool = True,
    force: bool = False,
    workers: Optional[int] = None,
) -> str:
    """Generates the world into ``output_dir`` unless a complete tree of this config is there.

    The tree is built in a sibling temporary folder and moved in once its manifest is written,
    so an interrupted run never leaves a tree that a later call takes for complete.

    Args:
        output_dir: the VOC root to create (e.g. ``$DETECTRON2_DATASETS/shapes_ovd``).
        cfg: sizes and seed; the defaults of :class:`WorldConfig` if None.
        novel_classes: class names to hold out; the default 12/4 split's novel classes if None.
        progress: show a progress bar on stderr.
        force: regenerate even if a matching tree exists.
        workers: processes to draw with; all cores (up to 8) if None.

    Returns:
        ``output_dir``.
    """
    cfg = cfg or WorldConfig()
    cfg.validate()
    split = make_split(novel_classes)
    root = os.path.normpath(output_dir)
    if os.path.islink(root):
        # Build beside the link's target, so that the swap replaces the target, not the link.
        root = os.path.realpath(root)
    if not force and is_complete(root, cfg, split):
        return output_dir
    _check_replaceable(root)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    _remove_stale_siblings(root)
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate_world(tmp, cfg, split, progress=progress, workers=workers)
        _swap_in(tmp, root, cfg, split)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


# ---------------------------------------------------------------------------- preview


def save_preview(
    world_dir: str,
    path: str,
    num_images: int = 8,
    image_set: str = "test",
    columns: int = 4,
    scale: float = 3.0,
) -> None:
    """A PNG grid of the first images of ``image_set`` with their annotated boxes and classes.

    Novel classes are labelled with a trailing "*".
    """
    from detectron2.data.catalog import Metadata
    from detectron2.data.datasets.pascal_voc import load_voc_instances
    from detectron2.utils.visualizer import Visualizer

    split = load_split(os.path.join(world_dir, "split.json"))
    novel = set(split.novel_classes)
    labels = [f"{c}*" if c in novel else c for c in split.classes]
    metadata = Metadata(name=split.name).set(thing_classes=labels)
    dicts = load_voc_instances(world_dir, image_set, list(split.classes))[:num_images]
    tiles = []
    for d in dicts:
        image = np.asarray(Image.open(d["file_name"]).convert("RGB"))
        vis = Visualizer(image, metadata, scale=scale, font_size_scale=1.6)
        tiles.append(vis.draw_dataset_dict(d).get_image())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(_grid(tiles, columns)).save(path)


def _grid(tiles: List[np.ndarray], columns: int, pad: int = 4) -> np.ndarray:
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    cols = min(columns, len(tiles))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        y, x = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return grid
