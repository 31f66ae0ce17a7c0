"""The ViLD configuration node: ``add_vild_config(cfg)`` and nothing else."""
from detectron2.config import CfgNode as CN


def add_vild_config(cfg):
    """Add the ``cfg.MODEL.VILD`` node (and the few data keys ViLD needs) to a detectron2 config."""
    _C = cfg
    _C.MODEL.VILD = CN()
    # CLIP teacher: an OpenAI model name ("ViT-B/32"), an OpenAI .pt archive, a state-dict file
    # or the embedded world's teacher; loaded by vild_d2.teacher.load_clip.
    _C.MODEL.VILD.CLIP_MODEL = "ViT-B/32"
    # Dimension of the CLIP joint embedding space the region embeddings are projected into.
    _C.MODEL.VILD.EMBED_DIM = 512
    # Softmax temperature tau: logits = cosine / tau (the paper: 0.01, i.e. x100).
    _C.MODEL.VILD.TEMPERATURE = 0.01
    # Prompts of the class text embeddings: a set shipped with the package (["vild"]: the official
    # code's 63 templates and rules), templates of your own ("{}" the class name, "{article}" a or
    # an), or [] for the checkpoint's own (a teacher folder's manifest; else "vild"). Every prompt's
    # embedding is normalised, the embeddings averaged and the mean renormalised.
    _C.MODEL.VILD.PROMPT_TEMPLATES = ["vild"]
    # Average each class's synonyms into its text embedding where the dataset gives them (LVIS).
    _C.MODEL.VILD.TEXT_SYNONYMS = False
    # Optional precomputed class text embeddings (.npy, [num_classes, EMBED_DIM]) used
    # instead of computing them from CLIP_MODEL; "" computes (and caches) them.
    _C.MODEL.VILD.TEXT_EMBEDDINGS_PATH = ""
    # Where computed text embeddings are cached (keyed by checkpoint, templates and names).
    _C.MODEL.VILD.TEXT_EMBEDDINGS_CACHE_DIR = "datasets/cache/text_embeddings"
    # Std of the normal initialisation of the learned background embedding (then normalised).
    _C.MODEL.VILD.BACKGROUND_INIT_STD = 0.01
    # Weight of the ViLD-text (classification) loss.
    _C.MODEL.VILD.TEXT_LOSS_WEIGHT = 1.0
    # Weight of the ViLD-image L1 distillation loss (the paper: 0.5 for R50); 0 disables it.
    _C.MODEL.VILD.IMAGE_LOSS_WEIGHT = 0.5
    # Mode: "text" (ViLD-text), "vild" (text + image, one head), "image" (image loss only)
    # or "ensemble" (ViLD-ensemble: a second head for the image branch).
    _C.MODEL.VILD.MODE = "vild"
    # ViLD-ensemble geometric-mean weight lambda: base = p_text^l * p_img^(1-l),
    # novel = p_text^(1-l) * p_img^l.
    _C.MODEL.VILD.ENSEMBLE_LAMBDA = 2.0 / 3.0
    # Which head scores test detections of a ViLD-ensemble model: "ensemble" (both, combined),
    # "text" or "image" (one head read alone, e.g. to report ViLD-text/ViLD-image from one run).
    _C.MODEL.VILD.ENSEMBLE_TEST_HEAD = "ensemble"
    # Softmax temperature of class scores from embeddings that only imitate CLIP's image encoder
    # (never trained with the classification loss): the distilled image head (ViLD-ensemble's,
    # MODE "image") and CLIP on crops. 0 = TEMPERATURE. The paper uses 0.01 for every head, which
    # is real CLIP's own (logit scale 100); a CLIP model with another logit scale s calibrates its
    # probabilities at 1 / s.
    _C.MODEL.VILD.IMAGE_TEMPERATURE = 0.0
    # Label assignment of proposals to ground truth: "iou" (detectron2's matcher) or "iot"
    # (intersection over the ground-truth box's area, the original document's rule).
    _C.MODEL.VILD.LABEL_ASSIGNMENT = "iou"
    # IoT threshold above which a proposal takes the ground truth's class under "iot".
    _C.MODEL.VILD.IOT_THRESHOLD = 0.8
    # Unlabelled objects: a cached stage-1 proposal (MODEL.VILD.DISTILL.CACHE_DIR) scoring at least
    # this objectness that overlaps no ground-truth box (IoU below ROI_HEADS.IOU_THRESHOLDS[0]) is
    # taken for an object of a class without boxes, and background-labelled RoIs on it (IoU at or
    # above that threshold) leave the classification loss instead of teaching "background".
    # Not in the paper; 0 disables (the paper's recipe).
    _C.MODEL.VILD.UNLABELLED_OBJECTNESS = 0.0
    # Test-time scores: class probability x (the proposal's RPN objectness probability) ** this,
    # as the CLIP-on-crops baseline scores its crops. Not in the paper; 0 disables (the paper).
    _C.MODEL.VILD.OBJECTNESS_WEIGHT = 0.0
    # Stage 1: train on every box as one "object" class (with MODEL.ROI_HEADS.NUM_CLASSES 1).
    _C.MODEL.VILD.CLASS_AGNOSTIC_LABELS = False
    # Test-time vocabulary: class names; empty = the test dataset's thing_classes.
    _C.MODEL.VILD.TEST_VOCABULARY = []
    # Classes of the test vocabulary treated as novel by the ensemble; empty = the test
    # dataset's novel_classes metadata.
    _C.MODEL.VILD.TEST_NOVEL_CLASSES = []

    # Cached CLIP embeddings of stage-1 proposals (written by tools/precompute_clip_embeddings.py).
    _C.MODEL.VILD.DISTILL = CN()
    # Directory of the embedding cache; "" = no image distillation input.
    _C.MODEL.VILD.DISTILL.CACHE_DIR = ""
    # Number M of cached proposals per image used for the image loss (the paper: 300).
    _C.MODEL.VILD.DISTILL.NUM_PROPOSALS = 300
    # Crop scales around each proposal whose embeddings were summed (the paper: 1x and 1.5x).
    _C.MODEL.VILD.DISTILL.CROP_SCALES = [1.0, 1.5]
    # Proposals with a side under this many pixels (original image) are dropped before cropping;
    # 0 keeps every one (the official code: filter_distill_boxes_size 0).
    _C.MODEL.VILD.DISTILL.MIN_BOX_SIZE = 0.0
    # Sum the per-scale embeddings and L2-normalise (True) or keep the 1x embedding only.
    _C.MODEL.VILD.DISTILL.ENSEMBLE_CROPS = True
    # Batch size of crops per CLIP encoder call when precomputing.
    _C.MODEL.VILD.DISTILL.CROP_BATCH_SIZE = 256
    # Arithmetic of the CLIP image encoder when precomputing and for CLIP on crops: "auto" (fp16 on
    # CUDA, bf16 on a CPU with bfloat16 units, fp32 otherwise), "fp32", "bf16" or "fp16" (CUDA).
    # Part of the cache's key: a cache is never a mix.
    _C.MODEL.VILD.DISTILL.PRECISION = "auto"

    # Optimizer: "SGD" (detectron2's, with SOLVER.MOMENTUM) or "AdamW" (same parameter groups,
    # weight decay and gradient clipping; SOLVER.BASE_LR is Adam's step size).
    _C.SOLVER.OPTIMIZER = "SGD"
    # Train in bfloat16 mixed precision when MODEL.DEVICE is cpu (detectron2's SOLVER.AMP is
    # CUDA-only): the training forward runs under CPU autocast; region embeddings, their cosines
    # and the losses stay float32. Fast on CPUs with bfloat16 units (AVX512-BF16, AMX).
    _C.SOLVER.CPU_BF16 = False

    # A training image that does not decode: "stop" with one line naming it, or "skip" it (named in
    # a warning). Evaluation always stops. Missing images stop training at start-up either way.
    _C.DATALOADER.BAD_IMAGES = "stop"

    # Large-scale jitter (the paper's training input): each training image resized by a random
    # factor of IMAGE_SIZE, then cropped or padded to IMAGE_SIZE x IMAGE_SIZE, and flipped at random;
    # it replaces INPUT.MIN_SIZE_TRAIN's resize when enabled.
    _C.INPUT.LSJ = CN()
    # Use it for training images.
    _C.INPUT.LSJ.ENABLED = False
    # The side of the square training input (the paper: 1024).
    _C.INPUT.LSJ.IMAGE_SIZE = 1024
    # The smallest random scale factor (the paper: 0.1).
    _C.INPUT.LSJ.MIN_SCALE = 0.1
    # The largest random scale factor (the paper: 2.0).
    _C.INPUT.LSJ.MAX_SCALE = 2.0
    return cfg
