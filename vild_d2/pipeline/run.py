"""The main job: stage 1 -> CLIP cache -> ViLD trainings -> evaluations -> results.json /
results.md / pictures (the embedded world's pipeline builds its world and teacher first).

Every training, cache and evaluation is a tools/train_net.py or tools/precompute_clip_embeddings.py
command on a config file, printed in results.md as it ran. The recipe lives in the config files;
the pipeline adds paths (its output folder, the stage-1 weights, the cache, the CLIP checkpoint),
the seed and thread counts, and the user's own overrides. Every stage is skipped when its outputs
match its inputs, the merged config of its command included.
"""
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..distill.embedding_cache import FILES as CACHE_FILES
from ..utils import digest
from .commands import PATH_KEYS, Command, cfg_value, shown
from .stages import StageRunner

logger = logging.getLogger(__name__)

STAGE1 = "stage1_proposals.yaml"
TRAININGS = {"vild": "vild.yaml", "vild_ensemble": "vild_ensemble.yaml", "oracle": "oracle.yaml"}
ROWS = {  # results row: (the config it is evaluated with, the training whose final weights it reads)
    "clip_on_crops": ("clip_on_crops.yaml", "stage1"),
    "vild_text": ("vild_ensemble_text_head.yaml", "vild_ensemble"),
    "vild_image": ("vild_ensemble_image_head.yaml", "vild_ensemble"),
    "vild": ("vild.yaml", "vild"),
    "vild_ensemble": ("vild_ensemble.yaml", "vild_ensemble"),
    "oracle": ("oracle.yaml", "oracle"),
}


@dataclass
class PipelineOptions:
    output_dir: str = "output/shapes_ovd"  # the configs' own output folder: their paths stay as they are
    seed: int = 0
    quick: bool = False
    novel_classes: Optional[List[str]] = None
    datasets_dir: str = "datasets"  # where the world and its teacher are cached
    threads: int = 2  # CPU cores to use; parallel stages share them
    parallel: int = 3  # independent trainings run at once (1: one after another)
    stage1_iters: Optional[int] = None  # None: the config's schedule
    iters: Optional[int] = None  # iterations of each ViLD training; None: the config's schedule
    world: dict = field(default_factory=dict)  # WorldConfig overrides
    teacher: dict = field(default_factory=dict)  # TeacherConfig overrides
    dataset: str = "shapes"  # "shapes" (the embedded world) or "voc"
    voc_root: Optional[str] = None  # folder holding VOC2007/ (and VOC2012/)
    voc_train: str = "0712"  # VOC training images: 2007, 2012 or 0712 trainval
    clip_model: Optional[str] = None  # the CLIP checkpoint (VOC); the world uses its teacher
    opts: List[str] = field(default_factory=list)  # config overrides for every command
    tools_dir: str = "tools"  # holding train_net.py and precompute_clip_embeddings.py
    configs_dir: str = "configs"  # holding shapes_ovd/ and voc_ovd/

    @classmethod
    def quick_sizes(cls, **kw):
        """Minutes-long smoke run: a tiny world, a briefly trained teacher, a few iterations."""
        world = dict(num_trainval=24, num_test=12, num_teacher=160, num_teacher_val=40, image_size=128)
        return cls(quick=True, stage1_iters=8, iters=6, world=world,
                   teacher=dict(steps=30, batch_size=64), **kw)


def _say(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def _schedule(iters: Optional[int]) -> List[str]:
    """A shortened schedule: ``iters`` iterations, the step at 80%, four checkpoints."""
    if not iters:
        return []
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.8)},)",
            "SOLVER.CHECKPOINT_PERIOD", str(max(iters // 4, 1))]


class Pipeline:
    """Stage 1 -> CLIP cache -> ViLD, ViLD-ensemble and oracle trainings -> evaluation -> report.

    A subclass names its configs, datasets and CLIP checkpoint, and may add stages before stage 1.
    """

    configs_name: str  # the folder of configs under PipelineOptions.configs_dir
    dataset_name: str  # for results.json
    test_name: str  # the test set as the configs name it

    def __init__(self, opts: PipelineOptions, split):
        self.o = opts
        self.split = split
        self.configs = os.path.join(opts.configs_dir, self.configs_name)
        self.train_net = os.path.join(opts.tools_dir, "train_net.py")
        self.precompute_tool = os.path.join(opts.tools_dir, "precompute_clip_embeddings.py")
        for path in (self.train_net, self.precompute_tool, os.path.join(self.configs, STAGE1)):
            if not os.path.isfile(path):
                raise ValueError(f"{path} does not exist; run from the project's folder or pass "
                                 "--tools-dir / --configs-dir")
        self.out = os.path.abspath(opts.output_dir)
        self.env: Dict[str, str] = {}  # e.g. DETECTRON2_DATASETS, where the data is elsewhere
        # where the configs' own paths live (their stage 1's OUTPUT_DIR is <root>/stage1)
        self.config_root = os.path.dirname(os.path.abspath(self._cfg(STAGE1).OUTPUT_DIR))
        self.lane_threads = opts.threads
        self.beside_results = {}
        self.stages = None

    # ---- what a dataset provides --------------------------------------------------------
    @property
    def clip_model(self) -> Optional[str]:
        """The CLIP checkpoint, when it is not the configs' own."""
        return None

    def data_opts(self, config: str) -> List[str]:
        """Overrides that pick the data of ``config``, when it is not the configs' own."""
        return []

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

    # ---- commands -----------------------------------------------------------------------
    def _cfg(self, config: str, opts=()):
        from ..engine.defaults import load_cfg

        return load_cfg(os.path.join(self.configs, config), [*self.o.opts, *opts], cpu_fallback=False)

    def _relocated(self, path: str) -> str:
        """A path of the configs' output root moved into this run's output folder."""
        full = os.path.abspath(path)
        if full == self.config_root or full.startswith(self.config_root + os.sep):
            return os.path.join(self.out, os.path.relpath(full, self.config_root))
        return path

    def command(self, tool: str, config: str, flags: List[str], output_dir: str,
                weights: Optional[str] = None, iters: Optional[int] = None) -> Tuple[Command, str]:
        """The command running ``tool`` on ``config`` for this run, and its stage key (the digest
        of the merged config it runs with). The user's overrides come first, then the paths of
        this run and the seed; merging them here checks every override before anything runs."""
        user = [*self.o.opts, *_schedule(iters), *self.data_opts(config)]
        cfg = self._cfg(config, user[len(self.o.opts):])
        paths = {key: self._relocated(cfg_value(cfg, key)) for key in PATH_KEYS if cfg_value(cfg, key)}
        paths["OUTPUT_DIR"] = output_dir
        if weights:
            paths["MODEL.WEIGHTS"] = weights
        if self.clip_model:
            paths["MODEL.VILD.CLIP_MODEL"] = self.clip_model
        opts = list(user)
        for key, value in paths.items():
            if os.path.abspath(value) != os.path.abspath(cfg_value(cfg, key)):
                opts += [key, shown(value)]
        if tool == self.train_net:
            opts += ["SEED", str(self.o.seed)]
        merged = self._cfg(config, opts[len(self.o.opts):])
        cmd = Command(tool, os.path.join(self.configs, config), list(flags), opts, dict(self.env))
        return cmd, digest({"config": merged.dump(), "tool": os.path.basename(tool), "flags": flags})

    def _run(self, cmd: Command, threads: int, log_name: str) -> str:
        cmd = Command(cmd.tool, cmd.config, [*cmd.flags, "--threads", str(threads)], cmd.opts, cmd.env)
        _say(f"$ {cmd.text()}")
        cmd.run(os.path.join(self.out, "logs", f"{log_name}.log"))
        return cmd.text()

    def lanes(self, specs: List[dict]) -> int:
        """Stages of ``specs`` to run at once, counting only those not up to date; sets the torch
        threads each of them gets (``self.lane_threads``)."""
        todo = sum(not self.stages.is_current(**s) for s in specs)
        lanes = max(1, min(self.o.parallel, todo))
        self.lane_threads = max(1, self.o.threads // lanes)
        return lanes

    def training_stage(self, name: str, config: str, after: List[str], iters, weights=None,
                       threads: Optional[int] = None) -> dict:
        """A training's arguments for StageRunner.run; a training of other inputs stays aside
        until the new one is done (the same inputs resume from the last sound checkpoint)."""
        out_dir = os.path.join(self.out, name)
        cmd, key = self.command(self.train_net, config, ["--resume"], out_dir, weights, iters)

        def train():
            return {"command": self._run(cmd, threads or self.lane_threads, name),
                    "weights": os.path.join(out_dir, "model_final.pth")}

        return dict(name=name, key={"command": key}, fn=train, after=after,
                    outputs=[os.path.join(out_dir, "model_final.pth")],
                    replaces=[out_dir])

    def precompute_stage(self, stage1_weights: str, after: List[str]) -> dict:
        """The CLIP cache's arguments for StageRunner.run: the cache the training configs read,
        moved into this run's folder. A cache of other inputs is moved aside first (the cache
        refuses to mix keys), and deleted once the new one is done."""
        cache = self._relocated(self._cfg(TRAININGS["vild"]).MODEL.VILD.DISTILL.CACHE_DIR)
        cmd, key = self.command(self.precompute_tool, STAGE1, ["--output-dir", shown(cache)],
                                os.path.join(self.out, "stage1"), weights=stage1_weights)

        def precompute():
            return {"command": self._run(cmd, self.o.threads, "precompute"), "cache": cache}

        return dict(name="precompute", key={"command": key}, fn=precompute, after=after,
                    outputs=[os.path.join(cache, f) for f in (*CACHE_FILES, "manifest.json")],
                    replaces=[cache])

    def evaluation(self, row: str) -> Tuple[Command, str]:
        """The evaluation command of a results row, and its stage key."""
        config, source = ROWS[row]
        weights = os.path.join(self.out, source, "model_final.pth")
        return self.command(self.train_net, config, ["--eval-only"], os.path.join(self.out, "eval", row),
                            weights)

    def evaluation_stage(self, row: str, after: List[str]) -> dict:
        cmd, key = self.evaluation(row)
        out_dir = os.path.join(self.out, "eval", row)
        summary = os.path.join(out_dir, "inference", f"ovd_results_{self.test_name}.json")

        def evaluate():
            return {"command": self._run(cmd, self.o.threads, f"eval_{row}"), "summary": summary}

        return dict(name=f"evaluate_{row}", key={"command": key}, fn=evaluate, after=after,
                    outputs=[summary], replaces=[out_dir])

    # ---- the job ------------------------------------------------------------------------
    def run(self):
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        self.stages = st = StageRunner(self.out, log=_say)
        upstream = self.prepare()
        beside = self.beside_stage1(upstream)
        first = [self.training_stage("stage1", STAGE1, upstream, self.o.stage1_iters,
                                     threads=self.o.threads), *beside]
        # the critical path keeps every thread; a stage beside it shares the cores while it runs
        s1, *done = st.run_parallel(first, self.lanes(first))
        self.beside_results = {b["name"]: r for b, r in zip(beside, done)}
        upstream += [b["name"] for b in beside]
        cache = st.run(**self.precompute_stage(s1["weights"], ["stage1", *upstream]))
        specs = [self.training_stage(name, config, ["precompute"], self.o.iters)
                 for name, config in TRAININGS.items()]
        lanes = self.lanes(specs)
        if lanes > 1:
            _say(f"training {len(specs)} detectors, {lanes} at a time, {self.lane_threads} thread(s) each")
        trained = dict(zip(TRAININGS, st.run_parallel(specs, lanes)))
        trained["stage1"] = s1
        evaluated = {}
        for row, (_, source) in ROWS.items():
            after = ["stage1", *upstream] if source == "stage1" else [source]
            evaluated[row] = st.run(**self.evaluation_stage(row, after))
        commands = {"stage1": s1["command"], "precompute": cache["command"],
                    **{name: r["command"] for name, r in trained.items()}}
        return self.report(evaluated, commands)

    # ---- report -------------------------------------------------------------------------
    def report(self, evaluated: Dict[str, dict], commands: Dict[str, str]):
        from .report import draw_detections, method_row, plot_per_class_ap, predict_first, write_results

        summaries = {}
        for row, result in evaluated.items():
            with open(result["summary"]) as f:
                summaries[row] = json.load(f)
        methods = {row: method_row(s) for row, s in summaries.items()}
        seconds = {row: s["model_seconds_per_image"] for row, s in summaries.items()}
        novel = list(self.split.novel_classes)
        row_commands = {row: [commands[ROWS[row][1]], evaluated[row]["command"]] for row in ROWS}
        config = {"dataset": self.dataset_name, "test_dataset": self.test_name, "seed": self.o.seed,
                  "quick": self.o.quick, "novel_classes": novel, "opts": list(self.o.opts),
                  **self.report_config()}
        shared = {"stage 1": commands["stage1"], "CLIP cache": commands["precompute"]}
        md = write_results(self.out, methods, self.stages.seconds, seconds, config, novel,
                           shared, row_commands)
        plot_per_class_ap(methods, novel, os.path.join(self.out, "per_class_ap50.png"))
        test = self.register_test()
        for row in ("vild", "vild_ensemble"):
            cmd, _ = self.evaluation(row)
            dicts, preds, names = predict_first(cmd.config, cmd.opts, test, 6)
            draw_detections(dicts, preds, names, novel, os.path.join(self.out, f"detections_{row}.png"))
        print(md, flush=True)
        _say(f"results: {shown(os.path.join(self.out, 'results.json'))}, results.md, *.png")
        return methods
