"""The main job: world -> teacher -> stage 1 -> CLIP cache -> ViLD trainings -> evaluation ->
results.json / results.md / pictures. Every stage is skipped when its outputs match its inputs."""
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from .stages import StageRunner, key_digest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
PRECOMPUTE = os.path.join(REPO, "tools", "precompute_clip_embeddings.py")
SHAPES_CONFIGS = os.path.join(REPO, "configs", "shapes_ovd")
logger = logging.getLogger("vild_d2.pipeline")


@dataclass
class PipelineOptions:
    output_dir: str = "output/demo"
    seed: int = 0
    quick: bool = False
    novel_classes: Optional[List[str]] = None
    datasets_dir: str = "datasets"  # where the world and its teacher are cached
    threads: int = 2
    stage1_iters: int = 400
    iters: int = 300
    finetune_lr: float = 0.005
    world: dict = field(default_factory=dict)  # WorldConfig overrides
    teacher: dict = field(default_factory=dict)  # TeacherConfig overrides

    @classmethod
    def quick_sizes(cls, **kw):
        """Minutes-long smoke run: a tiny world, a briefly trained teacher, a few iterations."""
        world = dict(num_trainval=24, num_test=12, num_teacher=160, num_teacher_val=40, image_size=128)
        return cls(quick=True, stage1_iters=8, iters=6, world=world,
                   teacher=dict(steps=30, batch_size=64), **kw)


def _say(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def _run(cmd: List[str], env: dict, log_path: str) -> None:
    """Run a tool, its output to a log file; on failure show the log's tail and stop."""
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{os.path.basename(cmd[1])} failed (exit {proc.returncode}); log {log_path}:\n{tail}")


class ShapesPipeline:
    def __init__(self, opts: PipelineOptions):
        from ..data.shapes_world import WorldConfig, make_split, check_attribute_coverage

        self.o = opts
        self.world_cfg = WorldConfig(seed=opts.seed, **opts.world)
        split = make_split(opts.novel_classes)  # raises a one-line SplitError when invalid
        check_attribute_coverage(split)
        self.split = split
        self.out = os.path.abspath(opts.output_dir)
        os.makedirs(self.out, exist_ok=True)
        default = opts.world == {} and opts.seed == 0 and opts.novel_classes is None
        tag = "" if default else "-" + key_digest([dataclasses.asdict(self.world_cfg), split.to_dict()])[:8]
        self.world_dir = os.path.abspath(os.path.join(opts.datasets_dir, f"shapes_ovd{tag}"))
        self.teacher_dir = self.world_dir + "_teacher"
        # train_net.py registers $DETECTRON2_DATASETS/shapes_ovd: point it at this world
        self.d2_root = os.path.join(self.out, "datasets")
        self.env = dict(os.environ, DETECTRON2_DATASETS=self.d2_root, PYTHONUNBUFFERED="1")
        self.stages = StageRunner(self.out, log=_say)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    # ---- stages -------------------------------------------------------------------------
    def build_world(self):
        from ..data.shapes_world import ensure_world

        ensure_world(self.world_dir, self.world_cfg, novel_classes=self.split.novel_classes)
        os.makedirs(self.d2_root, exist_ok=True)
        link = os.path.join(self.d2_root, "shapes_ovd")
        if os.path.islink(link) or os.path.exists(link):
            os.remove(link)
        os.symlink(self.world_dir, link)
        return {"world_dir": self.world_dir}

    def build_teacher(self):
        from ..teacher.ensure import ensure_teacher
        from ..teacher.train_teacher import TeacherConfig

        m = ensure_teacher(self.world_dir, self.teacher_dir,
                           TeacherConfig(seed=self.o.seed, **self.o.teacher))
        return {k: m[k] for k in ("heldout_accuracy_all", "heldout_accuracy_novel", "fingerprint")}

    @property
    def teacher_ckpt(self):
        return os.path.join(self.teacher_dir, "clip_teacher.pt")

    def _common_opts(self, out_dir, iters):
        return [
            "OUTPUT_DIR", out_dir, "SEED", str(self.o.seed), "MODEL.DEVICE", "cpu",
            "MODEL.VILD.CLIP_MODEL", self.teacher_ckpt, "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", f"({int(iters * 0.8)},)", "SOLVER.CHECKPOINT_PERIOD", str(max(iters // 4, 1)),
            "MODEL.VILD.TEXT_EMBEDDINGS_CACHE_DIR", os.path.join(self.out, "text_embeddings"),
            "TEST.EVAL_PERIOD", "0",
        ]

    def train(self, name, config, iters, extra=()):
        out_dir = os.path.join(self.out, name)
        cmd = [sys.executable, TRAIN_NET, "--config-file", os.path.join(SHAPES_CONFIGS, config),
               "--resume", "--threads", str(self.o.threads), *self._common_opts(out_dir, iters),
               *extra, "DATASETS.TEST", "()"]
        _say(f"{name}: training {iters} iterations (log: {os.path.relpath(self.logs)}/{name}.log)")
        _run(cmd, self.env, os.path.join(self.logs, f"{name}.log"))
        return {"weights": os.path.join(out_dir, "model_final.pth")}

    def precompute(self, stage1_weights):
        cache = os.path.join(self.out, "clip_cache")
        cmd = [sys.executable, PRECOMPUTE, "--config-file",
               os.path.join(SHAPES_CONFIGS, "stage1_proposals.yaml"),
               "--clip-model", self.teacher_ckpt, "--output-dir", cache,
               "MODEL.WEIGHTS", stage1_weights, "MODEL.DEVICE", "cpu",
               "OUTPUT_DIR", os.path.join(self.out, "stage1")]
        _say("precomputing CLIP embeddings of stage-1 proposals")
        _run(cmd, self.env, os.path.join(self.logs, "precompute.log"))
        return {"cache": cache}

    def run(self):
        st = self.stages
        world_key = {"world": dataclasses.asdict(self.world_cfg), "split": self.split.to_dict()}
        st.run("world", world_key, self.build_world,
               outputs=[os.path.join(self.world_dir, "manifest.json")])
        teacher = st.run("teacher", {"teacher": self.o.teacher, "seed": self.o.seed}, self.build_teacher,
                         outputs=[self.teacher_ckpt], after=["world"])
        s1 = st.run("stage1", {"iters": self.o.stage1_iters},
                    lambda: self.train("stage1", "stage1_proposals.yaml", self.o.stage1_iters),
                    outputs=[os.path.join(self.out, "stage1", "model_final.pth")], after=["world"],
                    clean=lambda: shutil.rmtree(os.path.join(self.out, "stage1"), ignore_errors=True))
        cache = st.run("precompute", {}, lambda: self.precompute(s1["weights"]),
                       outputs=[os.path.join(self.out, "clip_cache", "manifest.json")],
                       after=["stage1", "teacher"])
        # fine-tuning from stage 1: at the from-scratch rate (0.02) the new cosine classifier's
        # gradients wreck the stage-1 box regression (loss_box_reg 0.36 -> 0.93 in 100 iterations)
        init = ["MODEL.WEIGHTS", s1["weights"], "MODEL.VILD.DISTILL.CACHE_DIR", cache["cache"],
                "SOLVER.BASE_LR", str(self.o.finetune_lr)]
        runs = {
            "vild": ("vild.yaml", []),
            "vild_ensemble": ("vild_ensemble.yaml", []),
            "oracle": ("vild.yaml", ["DATASETS.TRAIN", "('shapes_ovd_trainval_all',)"]),
        }
        weights = {}
        for name, (config, extra) in runs.items():
            weights[name] = st.run(
                f"train_{name}", {"iters": self.o.iters, "config": config, "extra": extra,
                                  "lr": self.o.finetune_lr},
                lambda c=config, e=extra, n=name: self.train(n, c, self.o.iters, init + e),
                outputs=[os.path.join(self.out, name, "model_final.pth")],
                after=["precompute"],
                clean=lambda n=name: shutil.rmtree(os.path.join(self.out, n), ignore_errors=True),
            )["weights"]
        rows = {  # row: (trained model, its config, test-time head)
            "vild_text": ("vild_ensemble", "vild_ensemble.yaml", "text"),
            "vild_image": ("vild_ensemble", "vild_ensemble.yaml", "image"),
            "vild": ("vild", "vild.yaml", "ensemble"),
            "vild_ensemble": ("vild_ensemble", "vild_ensemble.yaml", "ensemble"),
            "oracle": ("oracle", "vild.yaml", "ensemble"),
        }
        evaluated = {
            "clip_on_crops": st.run(
                "evaluate_clip_on_crops", {"config": "vild.yaml"},
                lambda: self.evaluate("clip_on_crops", s1["weights"], "vild.yaml", "ensemble"),
                outputs=[os.path.join(self.out, "eval", "clip_on_crops.json")],
                after=["stage1", "teacher"],
            )
        }
        for row, (trained, config, head) in rows.items():
            evaluated[row] = st.run(
                f"evaluate_{row}", {"head": head, "config": config},
                lambda t=trained, c=config, h=head, r=row: self.evaluate(r, weights[t], c, h),
                outputs=[os.path.join(self.out, "eval", f"{row}.json")], after=[f"train_{trained}"],
            )
        return self.report(evaluated, teacher)

    # ---- evaluation and report ----------------------------------------------------------
    def _eval_cfg(self, config, head):
        from ..engine.trainer import load_cfg

        cfg = load_cfg(os.path.join(SHAPES_CONFIGS, config), [
            *self._common_opts(os.path.join(self.out, "eval"), 1),
            "MODEL.VILD.ENSEMBLE_TEST_HEAD", head, "DATASETS.TEST", "('pipeline_shapes_test',)",
            "DATALOADER.NUM_WORKERS", "0",
        ])
        cfg.freeze()
        return cfg

    def _register(self):
        from detectron2.data import DatasetCatalog

        from ..data.datasets import register_shapes_ovd

        if "pipeline_shapes_test" not in DatasetCatalog.list():
            register_shapes_ovd(self.d2_root, name="shapes_ovd", prefix="pipeline_shapes")

    def evaluate(self, row, weights, config, head):
        import torch

        from .evaluate import evaluate_clip_on_crops, evaluate_detector

        torch.set_num_threads(self.o.threads)
        self._register()
        cfg = self._eval_cfg(config, head)
        if row == "clip_on_crops":
            summary, seconds, preds = evaluate_clip_on_crops(cfg, weights)
        else:
            summary, seconds, preds = evaluate_detector(cfg, weights)
        os.makedirs(os.path.join(self.out, "eval"), exist_ok=True)
        torch.save(preds, os.path.join(self.out, "eval", f"{row}_pictures.pth"))
        result = {"summary": summary, "seconds_per_image": seconds}
        with open(os.path.join(self.out, "eval", f"{row}.json"), "w") as f:
            json.dump(result, f, indent=1)
        _say(f"{row}: novel AP50 {summary['metrics'].get('AP50_novel', 0):.1f}, "
             f"base AP50 {summary['metrics'].get('AP50_base', 0):.1f}")
        return result

    def report(self, evaluated, teacher):
        import torch

        from .evaluate import class_names, test_dicts
        from .report import draw_detections, method_row, plot_per_class_ap, write_results

        self._register()
        methods = {r: method_row(e["summary"]) for r, e in evaluated.items()}
        seconds = {r: e["seconds_per_image"] for r, e in evaluated.items()}
        novel = list(self.split.novel_classes)
        config = {"dataset": "shapes_ovd", "test_dataset": "shapes_ovd_test", "seed": self.o.seed,
                  "quick": self.o.quick, "novel_classes": novel, "stage1_iters": self.o.stage1_iters,
                  "iters": self.o.iters, "world": dataclasses.asdict(self.world_cfg),
                  "teacher": teacher}
        md = write_results(self.out, methods, self.stages.seconds, seconds, config, novel)
        plot_per_class_ap(methods, novel, os.path.join(self.out, "per_class_ap50.png"))
        dicts = test_dicts("pipeline_shapes_test", 6)
        for row in ("vild", "vild_ensemble"):
            preds = torch.load(os.path.join(self.out, "eval", f"{row}_pictures.pth"), weights_only=False)
            draw_detections(dicts, preds, class_names("pipeline_shapes_test"), novel,
                            os.path.join(self.out, f"detections_{row}.png"))
        print(md, flush=True)
        _say(f"results: {os.path.join(self.out, 'results.json')}, results.md, *.png")
        return methods
