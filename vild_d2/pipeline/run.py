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
    threads: int = 2  # CPU cores to use; parallel stages share them
    parallel: int = 3  # independent trainings run at once (1: one after another)
    stage1_iters: Optional[int] = None  # None: the dataset's default
    iters: Optional[int] = None  # iterations of each ViLD training; None: the dataset's default
    finetune_lr: Optional[float] = None  # learning rate of the trainings started from stage 1
    world: dict = field(default_factory=dict)  # WorldConfig overrides
    teacher: dict = field(default_factory=dict)  # TeacherConfig overrides
    dataset: str = "shapes"  # "shapes" (the embedded world) or "voc"
    voc_root: Optional[str] = None  # folder holding VOC2007/ (and VOC2012/)
    voc_train: str = "0712"  # VOC training images: 2007, 2012 or 0712 trainval
    clip_model: Optional[str] = None  # the CLIP checkpoint (VOC); the world uses its teacher
    opts: List[str] = field(default_factory=list)  # config overrides for every training and evaluation

    @classmethod
    def quick_sizes(cls, **kw):
        """Minutes-long smoke run: a tiny world, a briefly trained teacher, a few iterations."""
        world = dict(num_trainval=24, num_test=12, num_teacher=160, num_teacher_val=40, image_size=128)
        return cls(quick=True, stage1_iters=8, iters=6, world=world,
                   teacher=dict(steps=30, batch_size=64), **kw)


def config_digest(path: str) -> str:
    """Digest of a config file and the _BASE_ files it builds on (a stage's key includes it, so
    an edited config retrains)."""
    import yaml

    texts = []
    while path:
        with open(path) as f:
            text = f.read()
        texts.append(text)
        base = (yaml.safe_load(text) or {}).get("_BASE_")
        path = os.path.join(os.path.dirname(path), base) if base else None
    return key_digest(texts)


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


class Pipeline:
    """Stage 1 -> CLIP cache -> ViLD, ViLD-ensemble and oracle trainings -> evaluation -> report.

    A subclass names its configs, datasets and CLIP checkpoint, and may add stages before stage 1.
    """

    configs_dir: str
    dataset_name: str  # for results.json
    test_name: str  # the test set as train_net.py knows it
    init_from_stage1 = False  # start the ViLD trainings from the stage-1 weights
    default_stage1_iters: Optional[int] = None  # None: the config's schedule
    default_iters: Optional[int] = None
    default_finetune_lr: Optional[float] = None
    finetune_opts: List[str] = []  # config overrides of the ViLD trainings (not stage 1)

    def __init__(self, opts: PipelineOptions, split):
        self.o = opts
        self.split = split
        self.stage1_iters = opts.stage1_iters or self.default_stage1_iters
        self.iters = opts.iters or self.default_iters
        self.finetune_lr = opts.finetune_lr or self.default_finetune_lr
        self.out = os.path.abspath(opts.output_dir)
        os.makedirs(self.out, exist_ok=True)
        self.stages = StageRunner(self.out, log=_say)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.beside_results = {}
        self.lane_threads = opts.threads

    # ---- what a dataset provides --------------------------------------------------------
    @property
    def clip_model(self) -> str:
        raise NotImplementedError

    def train_datasets(self, oracle: bool) -> str:
        raise NotImplementedError

    def register_test(self) -> str:
        """Register the test set in this process; returns its name."""
        raise NotImplementedError

    def prepare(self) -> List[str]:
        """Stages before stage 1; returns their names (stage 1 depends on them)."""
        return []

    def beside_stage1(self, upstream: List[str]) -> List[dict]:
        """Stages (StageRunner.run arguments) that may run at the same time as stage 1, on
        ``self.lane_threads`` threads each; the CLIP cache depends on them."""
        return []

    def report_config(self) -> dict:
        return {}

    # ---- stages -------------------------------------------------------------------------
    def _common_opts(self, out_dir, iters):
        opts = ["OUTPUT_DIR", out_dir, "SEED", str(self.o.seed), "MODEL.DEVICE", "cpu",
                "MODEL.VILD.CLIP_MODEL", self.clip_model, "TEST.EVAL_PERIOD", "0",
                "MODEL.VILD.TEXT_EMBEDDINGS_CACHE_DIR", os.path.join(self.out, "text_embeddings")]
        if iters:
            opts += ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.8)},)",
                     "SOLVER.CHECKPOINT_PERIOD", str(max(iters // 4, 1))]
        return opts

    def lanes(self, specs: List[dict]) -> int:
        """Stages of ``specs`` to run at once, counting only those not up to date; sets the torch
        threads each of them gets (``self.lane_threads``)."""
        todo = sum(not self.stages.is_current(**s) for s in specs)
        lanes = max(1, min(self.o.parallel, todo))
        self.lane_threads = max(1, self.o.threads // lanes)
        return lanes

    def train(self, name, config, iters, extra=(), threads=None):
        out_dir = os.path.join(self.out, name)
        threads = threads or self.lane_threads
        cmd = [sys.executable, TRAIN_NET, "--config-file", os.path.join(self.configs_dir, config),
               "--resume", "--threads", str(threads), *self._common_opts(out_dir, iters), *extra,
               "DATASETS.TEST", "()", *self.o.opts]  # the user's overrides win
        what = f"{iters} iterations" if iters else "the config's schedule"
        _say(f"{name}: training {what} (log: {os.path.relpath(self.logs)}/{name}.log)")
        _run(cmd, self.env, os.path.join(self.logs, f"{name}.log"))
        return {"weights": os.path.join(out_dir, "model_final.pth")}

    def precompute(self, stage1_weights):
        cache = os.path.join(self.out, "clip_cache")
        cmd = [sys.executable, PRECOMPUTE, "--config-file",
               os.path.join(self.configs_dir, "stage1_proposals.yaml"),
               "--clip-model", self.clip_model, "--output-dir", cache, "--threads", str(self.o.threads),
               "--dataset", self.train_datasets(oracle=False),
               "MODEL.WEIGHTS", stage1_weights, "MODEL.DEVICE", "cpu",
               "OUTPUT_DIR", os.path.join(self.out, "stage1"), *self.o.opts]
        _say("precomputing CLIP embeddings of stage-1 proposals")
        _run(cmd, self.env, os.path.join(self.logs, "precompute.log"))
        return {"cache": cache}

    def stage1_stage(self, after) -> dict:
        """Stage 1's arguments for StageRunner.run."""
        return dict(
            name="stage1", key={"iters": self.stage1_iters, "opts": self.o.opts,
                                "config": config_digest(os.path.join(self.configs_dir, "stage1_proposals.yaml"))},
            # the critical path keeps every thread; a stage beside it shares the cores while it
            # runs, and none idles once that stage is done
            fn=lambda: self.train("stage1", "stage1_proposals.yaml", self.stage1_iters,
                                  ["DATASETS.TRAIN", f"('{self.train_datasets(oracle=False)}',)"],
                                  threads=self.o.threads),
            outputs=[os.path.join(self.out, "stage1", "model_final.pth")], after=after,
            clean=lambda: shutil.rmtree(os.path.join(self.out, "stage1"), ignore_errors=True))

    def precompute_stage(self, stage1_weights, after) -> dict:
        """The CLIP cache's arguments for StageRunner.run. A cache of other inputs (a retrained
        stage 1, another teacher) is removed first: the cache refuses to mix keys."""
        cache = os.path.join(self.out, "clip_cache")
        return dict(
            name="precompute", key={"opts": self.o.opts}, fn=lambda: self.precompute(stage1_weights),
            outputs=[os.path.join(cache, "manifest.json")], after=after,
            clean=lambda: shutil.rmtree(cache, ignore_errors=True))

    def run(self):
        st = self.stages
        upstream = self.prepare()
        beside = self.beside_stage1(upstream)
        first = [self.stage1_stage(upstream), *beside]
        s1, *done = st.run_parallel(first, self.lanes(first))
        self.beside_results = {b["name"]: r for b, r in zip(beside, done)}
        upstream += [b["name"] for b in beside]
        cache = st.run(**self.precompute_stage(s1["weights"], ["stage1", *upstream]))
        init = ["MODEL.VILD.DISTILL.CACHE_DIR", cache["cache"]]
        if self.init_from_stage1:
            init += ["MODEL.WEIGHTS", s1["weights"]]
        if self.finetune_lr:
            init += ["SOLVER.BASE_LR", str(self.finetune_lr)]
        init += self.finetune_opts
        runs = {"vild": "vild.yaml", "vild_ensemble": "vild_ensemble.yaml", "oracle": "vild.yaml"}
        specs = []
        for name, config in runs.items():
            train_set = ["DATASETS.TRAIN", f"('{self.train_datasets(oracle=name == 'oracle')}',)"]
            # the oracle has every box: whatever a stage-1 proposal finds unmatched is background
            extra = ["MODEL.VILD.UNLABELLED_OBJECTNESS", "0.0"] if name == "oracle" else []
            specs.append(dict(
                name=f"train_{name}",
                key={"iters": self.iters, "config": config, "extra": extra, "lr": self.finetune_lr,
                     "config_digest": config_digest(os.path.join(self.configs_dir, config)),
                     "init_from_stage1": self.init_from_stage1, "finetune": self.finetune_opts,
                     "opts": self.o.opts},
                fn=lambda c=config, e=train_set + extra, n=name: self.train(n, c, self.iters, init + e),
                outputs=[os.path.join(self.out, name, "model_final.pth")],
                after=["precompute"],
                clean=lambda n=name: shutil.rmtree(os.path.join(self.out, n), ignore_errors=True),
            ))
        lanes = self.lanes(specs)
        if lanes > 1:
            _say(f"training {len(specs)} detectors, {lanes} at a time, {self.lane_threads} thread(s) each")
        weights = dict(zip(runs, (r["weights"] for r in st.run_parallel(specs, lanes))))
        rows = {  # row: (trained model, its config, test-time head)
            "vild_text": ("vild_ensemble", "vild_ensemble.yaml", "text"),
            "vild_image": ("vild_ensemble", "vild_ensemble.yaml", "image"),
            "vild": ("vild", "vild.yaml", "ensemble"),
            "vild_ensemble": ("vild_ensemble", "vild_ensemble.yaml", "ensemble"),
            "oracle": ("oracle", "vild.yaml", "ensemble"),
        }
        evaluated = {
            "clip_on_crops": st.run(
                "evaluate_clip_on_crops", {"config": "vild.yaml", "opts": self.o.opts},
                lambda: self.evaluate("clip_on_crops", s1["weights"], "vild.yaml", "ensemble"),
                outputs=[os.path.join(self.out, "eval", "clip_on_crops.json")],
                after=["stage1", *upstream],
            )
        }
        for row, (trained, config, head) in rows.items():
            evaluated[row] = st.run(
                f"evaluate_{row}", {"head": head, "config": config, "opts": self.o.opts},
                lambda t=trained, c=config, h=head, r=row: self.evaluate(r, weights[t], c, h),
                outputs=[os.path.join(self.out, "eval", f"{row}.json")], after=[f"train_{trained}"],
            )
        return self.report(evaluated)

    # ---- evaluation and report ----------------------------------------------------------
    def _eval_cfg(self, config, head, test_name):
        from ..engine.trainer import load_cfg

        cfg = load_cfg(os.path.join(self.configs_dir, config), [
            *self._common_opts(os.path.join(self.out, "eval"), None), *self.o.opts,
            "MODEL.VILD.ENSEMBLE_TEST_HEAD", head, "DATASETS.TEST", f"('{test_name}',)",
            "DATALOADER.NUM_WORKERS", "0",
        ])
        cfg.freeze()
        return cfg

    def evaluate(self, row, weights, config, head):
        import torch

        from .evaluate import evaluate_clip_on_crops, evaluate_detector

        torch.set_num_threads(self.o.threads)
        cfg = self._eval_cfg(config, head, self.register_test())
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

    def report(self, evaluated):
        import torch

        from .evaluate import class_names, test_dicts
        from .report import draw_detections, method_row, plot_per_class_ap, write_results

        test = self.register_test()
        methods = {r: method_row(e["summary"]) for r, e in evaluated.items()}
        seconds = {r: e["seconds_per_image"] for r, e in evaluated.items()}
        novel = list(self.split.novel_classes)
        config = {"dataset": self.dataset_name, "test_dataset": self.test_name, "seed": self.o.seed,
                  "quick": self.o.quick, "novel_classes": novel, "stage1_iters": self.stage1_iters,
                  "iters": self.iters, "finetune_lr": self.finetune_lr, "clip_model": self.clip_model,
                  "opts": list(self.o.opts), **self.report_config()}
        md = write_results(self.out, methods, self.stages.seconds, seconds, config, novel)
        plot_per_class_ap(methods, novel, os.path.join(self.out, "per_class_ap50.png"))
        dicts = test_dicts(test, 6)
        for row in ("vild", "vild_ensemble"):
            preds = torch.load(os.path.join(self.out, "eval", f"{row}_pictures.pth"), weights_only=False)
            draw_detections(dicts, preds, class_names(test), novel,
                            os.path.join(self.out, f"detections_{row}.png"))
        print(md, flush=True)
        _say(f"results: {os.path.join(self.out, 'results.json')}, results.md, *.png")
        return methods


def _teacher_config(opts: PipelineOptions, num_threads: int):
    """The world teacher's config: the user's overrides, the run's seed and threads (a run-only
    field, not in the config's cache key)."""
    from ..teacher.train_teacher import TeacherConfig

    return TeacherConfig(**dict(opts.teacher, seed=opts.seed, num_threads=num_threads))


class ShapesPipeline(Pipeline):
    """The main job on the embedded world: the world and its CLIP teacher come first."""

    configs_dir = SHAPES_CONFIGS
    dataset_name = "shapes_ovd"
    test_name = "shapes_ovd_test"
    init_from_stage1 = True
    default_stage1_iters = 400
    default_iters = 800
    # from stage 1, AdamW learns the new heads several times faster than SGD in this budget
    # (ViLD-ensemble's text head, 400 iterations: base AP50 57.9 against 34.1 with SGD at 0.02);
    # 4 images a step: twice the updates for the same images seen lifted ViLD-ensemble from
    # 50.2 / 43.6 to 70.6 / 59.7 base / novel AP50 (8 x 400 against 4 x 800) for ~16% more time
    default_finetune_lr = 5e-4
    finetune_opts = ["SOLVER.OPTIMIZER", "AdamW", "SOLVER.IMS_PER_BATCH", "4"]

    def __init__(self, opts: PipelineOptions):
        from ..data.shapes_world import WorldConfig, make_split, check_attribute_coverage

        split = make_split(opts.novel_classes)  # raises a one-line SplitError when invalid
        check_attribute_coverage(split)
        self.world_cfg = WorldConfig(seed=opts.seed, **opts.world)
        _teacher_config(opts, opts.threads)  # a bad teacher option fails before any work
        super().__init__(opts, split)
        default = opts.world == {} and opts.seed == 0 and opts.novel_classes is None
        tag = "" if default else "-" + key_digest([dataclasses.asdict(self.world_cfg), split.to_dict()])[:8]
        self.world_dir = os.path.abspath(os.path.join(opts.datasets_dir, f"shapes_ovd{tag}"))
        self.teacher_dir = self.world_dir + "_teacher"
        # train_net.py registers $DETECTRON2_DATASETS/shapes_ovd: point it at this world
        self.d2_root = os.path.join(self.out, "datasets")
        self.env = dict(os.environ, DETECTRON2_DATASETS=self.d2_root, PYTHONUNBUFFERED="1")

    @property
    def clip_model(self) -> str:
        return os.path.join(self.teacher_dir, "clip_teacher.pt")

    def train_datasets(self, oracle: bool) -> str:
        return "shapes_ovd_trainval_all" if oracle else "shapes_ovd_trainval_base"

    def register_test(self) -> str:
        from detectron2.data import DatasetCatalog

        from ..data.datasets import register_shapes_ovd

        if "pipeline_shapes_test" not in DatasetCatalog.list():
            register_shapes_ovd(self.d2_root, name="shapes_ovd", prefix="pipeline_shapes")
        return "pipeline_shapes_test"

    def build_world(self):
        from ..data.shapes_world import ensure_world

        ensure_world(self.world_dir, self.world_cfg, novel_classes=self.split.novel_classes)
        os.makedirs(self.d2_root, exist_ok=True)
        link = os.path.join(self.d2_root, "shapes_ovd")
        if os.path.islink(link) or os.path.exists(link):
            os.remove(link)
        os.symlink(self.world_dir, link)
        return {"world_dir": self.world_dir}

    def teacher_config(self):
        return _teacher_config(self.o, self.lane_threads)

    def build_teacher(self):
        import torch

        from ..teacher.ensure import ensure_teacher

        torch.set_num_threads(self.lane_threads)
        m = ensure_teacher(self.world_dir, self.teacher_dir, self.teacher_config())
        return {k: m[k] for k in ("heldout_accuracy_all", "heldout_accuracy_novel", "fingerprint")}

    def prepare(self) -> List[str]:
        world_key = {"world": dataclasses.asdict(self.world_cfg), "split": self.split.to_dict()}
        self.stages.run("world", world_key, self.build_world,
                        outputs=[os.path.join(self.world_dir, "manifest.json")])
        return ["world"]

    def beside_stage1(self, upstream):
        # the whole effective config, so a teacher of other defaults is never taken for this one
        return [dict(name="teacher", key={"teacher": self.teacher_config().cache_key()},
                     fn=self.build_teacher, outputs=[self.clip_model], after=upstream)]

    def report_config(self) -> dict:
        return {"world": dataclasses.asdict(self.world_cfg), "teacher": self.beside_results.get("teacher")}
