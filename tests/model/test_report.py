"""The fvcore report: exact parameters, DCNv3 counted by docs/model.md §1's convention, totals near the published."""
import json

import pytest
import torch

from internimage.model import DCNv3, create_model, model_report
from internimage.model.report import main, report_for, zero_stride_weights

from tests.model.model_cases import PARAMETERS


def test_dcnv3_core_counts_five_multiply_adds_per_output_channel_per_point():
    module = DCNv3(channels=32, groups=4).eval()
    height, width = 6, 5

    class Wrapper(torch.nn.Module):  # model_report feeds an image: turn it into channels-last features
        def __init__(self):
            super().__init__()
            self.dcn, self.levels = module, []

        def forward(self, image):
            return self.dcn(image[:, :1, :height, :width].expand(-1, 32, -1, -1).permute(0, 2, 3, 1))

    report = model_report(Wrapper(), img_size=8)
    pixels, channels = height * width, 32
    linears = pixels * channels * (channels * 2 + 4 * 9 * 2 + 4 * 9)  # input/output proj, offset, mask
    dw_conv, dw_norm = pixels * channels * 9, pixels * channels * 5
    assert report["flops"] == linears + dw_conv + dw_norm + 5 * 9 * pixels * channels


def test_zero_stride_weights_allocate_nothing_per_parameter():
    with torch.device("meta"):
        model = DCNv3(channels=64, groups=4)
    zero_stride_weights(model)
    assert all(p.device.type == "cpu" and p.stride() == (0,) * p.dim() for p in model.parameters())


@pytest.mark.parametrize("name", ["internimage_t", "internimage_b"])
def test_report_matches_published_parameters_and_flops(name):
    report = report_for(name)
    assert report["params"] == PARAMETERS[name] == sum(row["params"] for row in report["rows"])
    assert report["flops"] == pytest.approx(report["published_flops"], rel=0.03)
    assert report["flops"] == pytest.approx(report["layerwise_flops"], rel=0.01)
    assert [row["section"] for row in report["rows"]] == ["stem", "stage 0", "stage 1", "stage 2", "stage 3", "head"]
    assert sum(row["flops"] for row in report["rows"]) == report["flops"]


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    main(["--model", "internimage_t", "--img-size", "64", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "stage 2" in out and "29,918,424" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["model"] == "internimage_t" and saved["img_size"] == 64 and saved["params"] == 29_918_424


def test_flops_are_the_same_after_deepspeed_zero3_replaced_f_linear(monkeypatch):
    from deepspeed.runtime.zero.linear import zero3_linear_wrap  # what a ZeRO-3 engine leaves behind

    model = create_model("internimage_t", num_classes=10, depths=(1, 1, 2, 1))
    plain = model_report(model, 64)["flops"]
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    assert model_report(model, 64)["flops"] == plain
