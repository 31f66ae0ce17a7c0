"""The main job on Pascal VOC: the same stages as on the embedded world, with the configs/voc_ovd
recipe (R50-FPN from ImageNet weights), a real CLIP checkpoint and the 16/4 split of
vild_d2/data/metadata/voc_16_4.json."""
import os
from typing import List, Optional

from ..data.splits import SplitError, load_split
from .commands import shown
from .run import Pipeline, PipelineOptions

VOC_TRAIN_SETS = ("2007", "2012", "0712")


class VOCPipeline(Pipeline):
    configs_name = "voc_ovd"
    dataset_name = "voc_ovd"
    test_name = "voc_ovd_2007_test"

    def __init__(self, opts: PipelineOptions):
        if opts.novel_classes:
            raise SplitError("--novel-classes applies to the embedded world; the VOC split is "
                             "vild_d2/data/metadata/voc_16_4.json")
        if opts.voc_train not in VOC_TRAIN_SETS:
            raise SplitError(f"--voc-train must be one of {', '.join(VOC_TRAIN_SETS)}, got '{opts.voc_train}'")
        if not opts.voc_root:
            raise SplitError("--dataset voc needs --voc-root, the folder holding VOC2007/ (and VOC2012/)")
        root = os.path.abspath(opts.voc_root)
        folders = {"2007": ["VOC2007"], "2012": ["VOC2012", "VOC2007"], "0712": ["VOC2007", "VOC2012"]}
        for folder in folders[opts.voc_train]:
            if not os.path.isdir(os.path.join(root, folder, "Annotations")):
                raise SplitError(f"{os.path.join(root, folder)}: no VOC tree (Annotations/, JPEGImages/, "
                                 "ImageSets/Main/) there; point --voc-root at the folder holding it")
        super().__init__(opts, load_split("voc_16_4"))
        self.root = root
        # train_net.py and the precompute tool register voc_ovd_* under $DETECTRON2_DATASETS
        self.env["DETECTRON2_DATASETS"] = shown(root)

    @property
    def clip_model(self) -> Optional[str]:
        return self.o.clip_model

    def data_opts(self, config: str) -> List[str]:
        if self.o.voc_train == "0712":
            return []
        subset = "all" if config == "oracle.yaml" else "base"
        return ["DATASETS.TRAIN", f"('voc_ovd_{self.o.voc_train}_trainval_{subset}',)"]

    def register_test(self) -> str:
        from detectron2.data import DatasetCatalog

        from ..data.datasets import register_ovd_voc

        name = "pipeline_voc_test"
        if name not in DatasetCatalog.list():
            register_ovd_voc(name, os.path.join(self.root, "VOC2007"), "test", self.split,
                             subset="all", year=2007)
        return name

    def report_config(self) -> dict:
        return {"voc_root": self.root, "voc_train": self.o.voc_train}
