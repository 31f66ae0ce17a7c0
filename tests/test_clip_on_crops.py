import pytest
import torch

from vild_d2.baselines.clip_on_crops import CLIPOnCropsDetector


@pytest.mark.parametrize("temperature", [0.0, -0.07])
def test_a_temperature_that_is_not_positive_is_refused(temperature):
    with pytest.raises(ValueError, match="IMAGE_TEMPERATURE"):
        CLIPOnCropsDetector(torch.nn.Identity(), None, torch.randn(3, 8), temperature=temperature)
