"""What the main job leaves for people: results.json, results.md and pictures."""
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..utils import atomic_write, write_json

METHOD_TITLES = {
    "clip_on_crops": "CLIP on cropped regions (training-free)",
    "vild_text": "ViLD-text",
    "vild_image": "ViLD-image",
    "vild": "ViLD (text + image)",
    "vild_ensemble": "ViLD-ensemble",
    "oracle": "Oracle (trained with novel boxes)",
}


def method_row(summary: dict) -> dict:
    """The results.json row of one method from the evaluator's JSON summary."""
    m = summary["metrics"]
    return {
        "base_ap50": m.get("AP50_base", float("nan")),
        "novel_ap50": m.get("AP50_novel", float("nan")),
        "all_ap50": m["AP50"],
        "hmean_ap50": m.get("AP50_hmean", float("nan")),
        "per_class_ap50": summary["per_class_ap50"],
    }


def write_results(output_dir: str, methods: Dict[str, dict], stage_seconds: Dict[str, float],
                  inference_seconds: Dict[str, float], config: dict, novel: Sequence[str],
                  shared_commands: Dict[str, str], row_commands: Dict[str, List[str]]) -> str:
    """results.json and results.md; returns the markdown."""
    results = {
        "methods": methods,
        "stage_seconds": stage_seconds,
        "inference_seconds_per_image": inference_seconds,
        "config": config,
        "commands": {"shared": shared_commands, "rows": row_commands},
    }
    write_json(os.path.join(output_dir, "results.json"), results)
    md = results_markdown(methods, inference_seconds, stage_seconds, novel, config)
    md += commands_markdown(shared_commands, row_commands)
    with atomic_write(os.path.join(output_dir, "results.md")) as f:
        f.write(md)
    return md


def commands_markdown(shared: Dict[str, str], rows: Dict[str, List[str]]) -> str:
    """Each row's commands, as they ran (from the folder the pipeline ran in)."""
    lines = ["", "## The commands behind each row", "",
             "Run from the folder the pipeline ran in; each is the command the pipeline ran. "
             "First the stages every row shares:", "", "```bash"]
    lines += [f"# {name}\n{command}" for name, command in shared.items()]
    lines += ["```", ""]
    for name in METHOD_TITLES:
        if name in rows:
            train, evaluate = rows[name]
            lines += [f"{METHOD_TITLES[name]}:", "", "```bash"]
            if train not in shared.values():
                lines.append(train)
            lines += [evaluate, "```", ""]
    return "\n".join(lines)


def results_markdown(methods, inference_seconds, stage_seconds, novel, config) -> str:
    lines = [
        f"# Open-vocabulary detection on `{config.get('test_dataset', '?')}`",
        "",
        f"Novel classes (no box in training): {', '.join(novel)}. AP50 in percent.",
        "",
        "| method | novel AP50 | base AP50 | all AP50 | harmonic mean | inference s/image |",
        "|---|---|---|---|---|---|",
    ]
    for name in METHOD_TITLES:
        if name in methods:
            r = methods[name]
            t = inference_seconds.get(name)
            lines.append(
                f"| {METHOD_TITLES[name]} | {r['novel_ap50']:.1f} | {r['base_ap50']:.1f} | "
                f"{r['all_ap50']:.1f} | {r['hmean_ap50']:.1f} | {'' if t is None else f'{t:.3f}'} |"
            )
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()),
              ""]
    return "\n".join(lines)


def plot_per_class_ap(methods: Dict[str, dict], novel: Sequence[str], path: str) -> None:
    """Grouped bars of per-class AP50, novel classes shaded and starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in METHOD_TITLES if n in methods]
    classes = list(next(iter(methods.values()))["per_class_ap50"])
    order = [c for c in classes if c not in novel] + [c for c in classes if c in novel]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(order)), 4.5))
    x = np.arange(len(order))
    first_novel = len(order) - sum(c in novel for c in order)
    ax.axvspan(first_novel - 0.5, len(order) - 0.5, color="#fde9c8", zorder=0, label="novel classes")
    for i, name in enumerate(names):
        values = [methods[name]["per_class_ap50"][c] for c in order]
        ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=METHOD_TITLES[name], zorder=2)
    ax.set_xticks(x)
    ax.set_xticklabels([c + (" *" if c in novel else "") for c in order], rotation=45, ha="right")
    ax.set_ylabel("AP50 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Per-class AP50 (* novel: no box in training)", pad=48)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.01))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_detections(dataset_dicts: List[dict], predictions: List, class_names: Sequence[str],
                    novel: Sequence[str], path: str, score_thresh: float = 0.3,
                    columns: int = 3, scale: float = 2.5) -> None:
    """A grid of test images with detections; novel-class detections are red and starred."""
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer
    from PIL import Image

    tiles = []
    for d, inst in zip(dataset_dicts, predictions):
        image = read_image(d["file_name"], format="RGB")
        inst = inst[inst.scores >= score_thresh].to("cpu")
        labels, colors = [], []
        for c, s in zip(inst.pred_classes.tolist(), inst.scores.tolist()):
            name = class_names[c]
            is_novel = name in novel
            labels.append(f"{name}{' *' if is_novel else ''} {s:.2f}")
            colors.append((0.9, 0.1, 0.1) if is_novel else (0.1, 0.4, 0.9))
        v = Visualizer(image, scale=scale)
        v.overlay_instances(boxes=inst.pred_boxes, labels=labels, assigned_colors=colors)
        tiles.append(v.get_output().get_image())
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    grid = np.full((rows * (h + 6), columns * (w + 6), 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (h + 6) : r * (h + 6) + t.shape[0], c * (w + 6) : c * (w + 6) + t.shape[1]] = t
    Image.fromarray(grid).save(path)


def predict_first(config_file: str, opts: Sequence[str], dataset: str, n: int) -> Tuple[List[dict], List, List[str]]:
    """The first ``n`` images of ``dataset`` (its dicts), a model's detections on them through
    OVDPredictor (the config, with ``opts``, names the weights) and the dataset's class names."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image

    from ..engine import OVDPredictor, load_cfg

    names = list(MetadataCatalog.get(dataset).thing_classes)
    novel = list(MetadataCatalog.get(dataset).get("novel_classes", []))
    predictor = OVDPredictor(load_cfg(config_file, opts), names, novel)
    dicts = DatasetCatalog.get(dataset)[:n]
    preds = [predictor(read_image(d["file_name"], format="BGR"))["instances"].to("cpu") for d in dicts]
    return dicts, preds, names
