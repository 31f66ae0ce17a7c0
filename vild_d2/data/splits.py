"""Open-vocabulary class splits: a class list plus the novel subset, read from a small JSON file.

The file holds ``{"name": str, "classes": [...], "novel_classes": [...]}``; the base classes are
the classes that are not novel, in the order of ``classes``.
"""
import json
import os
from dataclasses import dataclass
from typing import List, Sequence, Union

from ..utils import UserError, write_json

# the split files shipped with the package
METADATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metadata")


class SplitError(UserError, ValueError):
    """A split file or split definition that cannot be used."""


@dataclass(frozen=True)
class OVDSplit:
    name: str
    classes: List[str]
    novel_classes: List[str]

    def __post_init__(self):
        if len(set(self.classes)) != len(self.classes):
            dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise SplitError(f"split '{self.name}': class names repeat: {dup}; make them unique")
        missing = [c for c in self.novel_classes if c not in self.classes]
        if missing:
            raise SplitError(
                f"split '{self.name}': novel classes {missing} are not in its classes; "
                "add them to 'classes' or fix the spelling"
            )
        if not self.base_classes:
            raise SplitError(f"split '{self.name}': every class is novel; keep at least one base class")

    @property
    def base_classes(self) -> List[str]:
        novel = set(self.novel_classes)
        return [c for c in self.classes if c not in novel]

    def to_dict(self):
        return {"name": self.name, "classes": list(self.classes), "novel_classes": list(self.novel_classes)}

    def with_novel(self, novel_classes: Sequence[str], name: str = None) -> "OVDSplit":
        """The same classes with another novel subset."""
        return OVDSplit(name or self.name, list(self.classes), list(novel_classes))


def load_split(spec: Union[str, dict, OVDSplit]) -> OVDSplit:
    """An OVDSplit from a JSON path, a split name under vild_d2/data/metadata/, a dict or a split."""
    if isinstance(spec, OVDSplit):
        return spec
    if isinstance(spec, dict):
        data, where = spec, "split dict"
    else:
        path = spec
        if not os.path.exists(path):
            candidate = os.path.join(METADATA_DIR, f"{spec}.json")
            if os.path.exists(candidate):
                path = candidate
            else:
                raise SplitError(
                    f"split file '{spec}' not found (nor {candidate}); pass a path to a JSON file "
                    'holding {"name", "classes", "novel_classes"}'
                )
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise SplitError(f"split file '{path}' is not valid JSON ({e}); fix the file") from None
        where = path
    for key in ("classes", "novel_classes"):
        if not isinstance(data.get(key), list) or not all(isinstance(c, str) for c in data[key]):
            raise SplitError(f"{where}: '{key}' must be a list of class names")
    name = data.get("name") or os.path.splitext(os.path.basename(str(where)))[0]
    return OVDSplit(name, list(data["classes"]), list(data["novel_classes"]))


def save_split(split: OVDSplit, path: str) -> None:
    write_json(path, split.to_dict(), indent=2)
