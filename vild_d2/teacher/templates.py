"""CLIP-style prompt templates ("{}" is the class name).

The same list captions the teacher's training crops and builds the detector's class text
embeddings, so the two see the same phrasing.
"""

from typing import List, Sequence

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a {}.",
)


def check_templates(templates: Sequence[str]) -> List[str]:
    """The templates as a list, each checked to hold exactly one "{}"."""
    templates = list(templates)
    if not templates:
        raise ValueError("no prompt templates given; pass at least one, e.g. 'a photo of a {}.'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"prompt template {t!r} must be a string holding exactly one '{{}}'")
    return templates


def fill_templates(templates: Sequence[str], class_names: Sequence[str]) -> List[List[str]]:
    """Captions ``[template][class]``."""
    return [[t.format(name) for name in class_names] for t in check_templates(templates)]
