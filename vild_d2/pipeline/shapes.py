"""The main job on the embedded world: the world and its CLIP teacher come first, then the
configs/shapes_ovd recipe."""
import dataclasses
import os
from typing import List, Optional

from ..utils import digest
from .commands import shown
from .run import Pipeline, PipelineOptions


def _teacher_config(opts: PipelineOptions, num_threads: int):
    """The world teacher's config: the user's overrides, the run's seed and threads (a run-only
    field, not in the config's cache key)."""
    from ..shapes_world.teacher_training import TeacherConfig

    return TeacherConfig(**dict(opts.teacher, seed=opts.seed, num_threads=num_threads))


class ShapesPipeline(Pipeline):
    configs_name = "shapes_ovd"
    dataset_name = "shapes_ovd"
    test_name = "shapes_ovd_test"

    def __init__(self, opts: PipelineOptions):
        from ..shapes_world.generator import WorldConfig, check_attribute_coverage, make_split

        split = make_split(opts.novel_classes)  # raises a one-line SplitError when invalid
        check_attribute_coverage(split)
        self.world_cfg = WorldConfig(seed=opts.seed, **opts.world)
        _teacher_config(opts, opts.threads)  # a bad teacher option fails before any work
        super().__init__(opts, split)
        default = opts.world == {} and opts.seed == 0 and opts.novel_classes is None
        tag = "" if default else "-" + digest([dataclasses.asdict(self.world_cfg), split.to_dict()])[:8]
        self.world_dir = os.path.abspath(os.path.join(opts.datasets_dir, f"shapes_ovd{tag}"))
        self.teacher_dir = self.world_dir + "_teacher"
        # the configs find the world as $DETECTRON2_DATASETS/shapes_ovd; another world is linked there
        self.d2_root = os.path.dirname(self.world_dir)
        if os.path.basename(self.world_dir) != "shapes_ovd":
            self.d2_root = os.path.join(self.out, "datasets")
        if os.path.abspath(os.environ.get("DETECTRON2_DATASETS", "datasets")) != self.d2_root:
            self.env["DETECTRON2_DATASETS"] = shown(self.d2_root)

    @property
    def clip_model(self) -> Optional[str]:
        return os.path.join(self.teacher_dir, "clip_teacher.pt")

    def register_test(self) -> str:
        from detectron2.data import DatasetCatalog

        from ..data.datasets import register_shapes_ovd

        if "pipeline_shapes_test" not in DatasetCatalog.list():
            register_shapes_ovd(self.d2_root, name="shapes_ovd", prefix="pipeline_shapes")
        return "pipeline_shapes_test"

    def build_world(self):
        from ..shapes_world.generator import ensure_world

        ensure_world(self.world_dir, self.world_cfg, novel_classes=self.split.novel_classes)
        link = os.path.join(self.d2_root, "shapes_ovd")
        if os.path.abspath(link) != self.world_dir:
            os.makedirs(self.d2_root, exist_ok=True)
            if os.path.islink(link) or os.path.exists(link):
                os.remove(link)
            os.symlink(self.world_dir, link)
        return {"world_dir": self.world_dir}

    def teacher_config(self):
        return _teacher_config(self.o, self.lane_threads)

    def build_teacher(self):
        import torch

        from ..shapes_world.teacher import ensure_teacher

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
