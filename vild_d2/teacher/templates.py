"""Prompt templates and the prompts they make of class names.

A template holds "{}" for the class name and may hold "{article}" ("a" or "an", by the name's
first letter). Sets of templates ship with the package as ``prompts/<name>.txt``; "vild" is the
official ViLD code's ensemble of 63, read with its rules: "_" in a class name reads as a space and
"/" as " or ", and a prompt that starts with "a" or "the" reads as "This is <prompt>".
``MODEL.VILD.PROMPT_TEMPLATES`` names a set (``["vild"]``) or lists templates of its own.
"""
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
DEFAULT_PROMPT_SET = "vild"


def clean_name(name: str) -> str:
    """A class name as prompts read it: "_" as a space, "/" as " or ", lower case, no final dot."""
    return name.replace("_", " ").replace("/", " or ").lower().rstrip(".")


def article(name: str) -> str:
    return "an" if name[:1].lower() in ("a", "e", "i", "o", "u") else "a"


def check_templates(templates: Sequence[str]) -> List[str]:
    """The templates as a list, each checked to hold exactly one "{}" (and nothing else to fill
    but "{article}")."""
    templates = list(templates)
    if not templates:
        raise ValueError("no prompt templates given; pass at least one, e.g. 'a photo of a {}.'")
    for t in templates:
        ok = isinstance(t, str) and t.count("{}") == 1
        try:
            ok = ok and t.format("x", article="a") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"prompt template {t!r} must be a string holding exactly one '{{}}' "
                             "(and, if it likes, '{article}')")
    return templates


@dataclass(frozen=True)
class PromptEnsemble:
    """Templates and the rule of the set they come from."""

    templates: Tuple[str, ...]
    this_is: bool = False  # "This is " before a prompt that starts with "a" or "the"

    def __post_init__(self):
        object.__setattr__(self, "templates", tuple(check_templates(self.templates)))

    def prompts(self, name: str) -> List[str]:
        """Every template filled with ``name`` (cleaned) and its article."""
        cleaned = clean_name(name)
        out = [t.format(cleaned, article=article(cleaned)) for t in self.templates]
        if self.this_is:
            out = [f"This is {p}" if p.startswith(("a", "the")) else p for p in out]
        return out

    def key(self) -> dict:
        return {"templates": list(self.templates), "this_is": self.this_is}


def prompt_sets() -> List[str]:
    return sorted(f[:-4] for f in os.listdir(PROMPTS_DIR) if f.endswith(".txt"))


def prompt_set(name: str) -> PromptEnsemble:
    """A set shipped with the package, with the official rules."""
    path = os.path.join(PROMPTS_DIR, f"{name}.txt")
    if not os.path.isfile(path):
        raise ValueError(f"no prompt set '{name}' (sets: {', '.join(prompt_sets())}); name one of "
                         "them or list templates holding '{}'")
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f]
    return PromptEnsemble(tuple(line for line in lines if line.strip() and not line.startswith("#")),
                          this_is=True)


def resolve_prompts(spec: Iterable[str], checkpoint_templates: Optional[Sequence[str]] = None
                    ) -> PromptEnsemble:
    """The ensemble a ``MODEL.VILD.PROMPT_TEMPLATES`` value means: ``[]`` the checkpoint's own
    templates (a teacher folder's manifest) or else the "vild" set; one word naming a set; or a
    list of templates, read as written."""
    spec = list(spec)
    if not spec:
        if checkpoint_templates:
            return PromptEnsemble(tuple(checkpoint_templates))
        return prompt_set(DEFAULT_PROMPT_SET)
    if len(spec) == 1 and "{" not in spec[0]:
        return prompt_set(spec[0])
    return PromptEnsemble(tuple(spec))


def fill_templates(templates: Sequence[str], class_names: Sequence[str]) -> List[List[str]]:
    """Captions ``[template][class]``, read as written (no set's rules)."""
    ensemble = PromptEnsemble(tuple(templates))
    per_class = [ensemble.prompts(name) for name in class_names]
    return [list(row) for row in zip(*per_class)]
