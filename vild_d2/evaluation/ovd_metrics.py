"""Grouping per-class AP into the open-vocabulary summary: base, novel, all, harmonic mean."""
import os
from typing import Dict, Iterable

import numpy as np

from ..utils import write_json


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b <= 0 else 2.0 * a * b / (a + b)


def summarize_ovd(per_class: Dict[str, Dict[int, float]], novel: Iterable[str]) -> dict:
    """Args: per_class = {class: {iou threshold in percent: AP in percent}}.

    Returns {"metrics": {...}, "per_class_ap50": {...}}: AP/AP50/AP75 over all classes, AP50 and
    AP (mean over thresholds) over base and novel classes, and the base/novel harmonic mean.
    Classes absent from the vocabulary group (no novel classes, say) leave that group out.
    """
    novel = set(novel)
    names = list(per_class)
    ap50 = {n: per_class[n][50] for n in names}
    ap = {n: float(np.mean(list(per_class[n].values()))) for n in names}
    groups = {"base": [n for n in names if n not in novel], "novel": [n for n in names if n in novel]}
    m = {"AP": float(np.mean(list(ap.values()))), "AP50": float(np.mean(list(ap50.values())))}
    if all(75 in per_class[n] for n in names):
        m["AP75"] = float(np.mean([per_class[n][75] for n in names]))
    for group, members in groups.items():
        if members:
            m[f"AP50_{group}"] = float(np.mean([ap50[n] for n in members]))
            m[f"AP_{group}"] = float(np.mean([ap[n] for n in members]))
    if groups["base"] and groups["novel"]:
        m["AP50_hmean"] = harmonic_mean(m["AP50_base"], m["AP50_novel"])
    return {"metrics": m, "per_class_ap50": ap50, "base_classes": groups["base"],
            "novel_classes": groups["novel"]}


def save_ovd_results(output_dir: str, dataset_name: str, novel: Iterable[str], summary: dict) -> str:
    """Write ``ovd_results_<dataset>.json`` (the dataset, its novel classes and ``summary``)."""
    path = os.path.join(output_dir, f"ovd_results_{dataset_name}.json")
    write_json(path, {"dataset": dataset_name, "novel_classes": sorted(novel), **summary})
    return path
