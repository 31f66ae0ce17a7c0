"""SOLVER.CPU_BF16: the training forward under CPU bfloat16 autocast, the text logits in float32."""
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform

from vild_d2.engine.cpu_autocast import TrainingAutocast
from vild_d2.modeling import ViLDTextPredictor


def test_training_forward_runs_in_bf16_and_inference_in_fp32():
    model = TrainingAutocast(torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    assert model.train()(x).dtype == torch.bfloat16
    assert model.eval()(x).dtype == torch.float32
    assert set(model.state_dict()) == {"module.weight", "module.bias"}


def test_region_embeddings_and_logits_stay_float32_under_autocast():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    pred = ViLDTextPredictor(ShapeSpec(channels=16), box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
                             text_embeddings=text)
    x = torch.randn(4, 16)
    want = pred(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pred(x)[0]
    assert got.dtype == torch.float32
    # bf16 cosines over a temperature of 0.01 would be off by tenths
    assert torch.allclose(got, want, atol=1e-4)
