"""TF-style "same" padding (timm's Conv2dSame) is exported as constant pads inside each Conv:
no shape arithmetic and no Pad node left in the encoder graph, the same outputs, and int8 ranges
of an export that still had the Pads keep working."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from captioning.deploy import onnx_export
from captioning.deploy.onnx_export import _pads_into_convs, export_encoder
from captioning.deploy.ort_quantize import encoder_ranges, quantize_encoder
from captioning.encoders import create_encoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py

IMG = 72  # not a multiple of 32: the strided layers' pads differ (0/1 and 1/1, before/after)


@pytest.fixture(scope="module")
def encoder():
    """A tf_ MobileNetV3 (five Conv2dSame layers) with trained-like batch norm statistics."""
    enc = create_encoder("tf_mobilenetv3_small_minimal_100", img_size=IMG).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return enc


def _ops(graph: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(graph).graph.node]


def _run(graph: bytes, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"images": x})


def _dynamic_export(encoder) -> bytes:
    """The encoder as exported before: timm's run-time pad arithmetic traced into the graph."""
    images = torch.zeros(2, 3, IMG, IMG)
    axes = {n: {0: "batch"} for n in ("images", "fc", "att")}
    with torch.no_grad():
        return onnx_export._export(encoder, (images,), ["images"], ["fc", "att"], axes)


def test_same_pads_become_constant_conv_pads_with_the_same_outputs(encoder):
    from timm.layers.conv2d_same import Conv2dSame

    assert sum(isinstance(m, Conv2dSame) for m in encoder.modules()) == 5
    old, new = _dynamic_export(encoder), export_encoder(encoder)
    assert export_encoder(encoder) == new  # deterministic: int8 ranges are keyed by its tensor names
    assert {"Pad", "Ceil"} <= set(_ops(old))  # what there was to remove
    assert not {"Pad", "Ceil", "Cast"} & set(_ops(new))
    assert _ops(new).count("Shape") < _ops(old).count("Shape")
    convs = [n for n in onnx.load_from_string(new).graph.node if n.op_type == "Conv"]
    pads = [list(next(a.ints for a in c.attribute if a.name == "pads")) for c in convs]
    assert any(p[:2] != p[2:] for p in pads)  # asymmetric: more after than before
    assert all(isinstance(m, Conv2dSame) for m in encoder.modules() if type(m).__name__ == "Conv2dSame")  # untouched

    x = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = [t.numpy() for t in encoder(x)]
    for got in (_run(new, x.numpy()), _run(old, x.numpy())):
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    for a, b in zip(_run(new, x.numpy()), _run(old, x.numpy())):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_int8_ranges_of_the_older_export_still_quantize_the_new_one(encoder):
    """An artifact packed before the pads were folded lists the Pads' outputs too: they are ignored,
    and the int8 encoder is the one the new export's own ranges give."""
    x = torch.randn(8, 3, IMG, IMG, generator=torch.Generator().manual_seed(2)).numpy()
    old, new = _dynamic_export(encoder), export_encoder(encoder)
    old_ranges, new_ranges = encoder_ranges(old, x), encoder_ranges(new, x)
    assert set(new_ranges) < set(old_ranges) and any("Pad" in name for name in set(old_ranges) - set(new_ranges))
    assert all(old_ranges[name] == r for name, r in new_ranges.items())
    assert quantize_encoder(new, old_ranges) == quantize_encoder(new, new_ranges)
    int8 = _run(quantize_encoder(new, new_ranges), x)[1]
    fp32 = _run(new, x)[1]
    assert np.abs(int8 - fp32).max() < 0.2 * np.abs(fp32).max()  # int8, not garbage


def _pad_conv_graph(pads, value=None, mode="constant", second_reader="Conv"):
    """x -> Pad -> Conv (pads 1) and a second reader of the padded tensor (a Conv without pads by default)."""
    inits = [numpy_helper.from_array(np.asarray(pads, dtype=np.int64), "pads"),
             numpy_helper.from_array(np.ones((2, 2, 3, 3), dtype=np.float32), "w")]
    pad_inputs = ["x", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), "value"))
        pad_inputs.append("value")
    nodes = [helper.make_node("Pad", pad_inputs, ["p"], "pad", mode=mode),
             helper.make_node("Conv", ["p", "w"], ["y"], "conv", pads=[1, 1, 1, 1])]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
    if second_reader:
        nodes.append(helper.make_node(second_reader, ["p", "w"] if second_reader == "Conv" else ["p"], ["z"], "other"))
        outputs.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 6, 6])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_zero_pad_read_only_by_convs_is_folded_and_adds_to_their_pads():
    model = _pad_conv_graph([0, 0, 0, 1, 0, 0, 2, 0])
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert _pads_into_convs(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Conv", "Conv"]
    pads = [[list(a.ints) for a in n.attribute if a.name == "pads"] for n in model.graph.node]
    assert pads == [[[1, 2, 3, 1]], [[0, 1, 2, 0]]]  # [top, left, bottom, right]: its own plus the Pad's
    assert "pads" not in {i.name for i in model.graph.initializer}  # the widths go with their Pad
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-6)


@pytest.mark.parametrize("case", [
    dict(pads=[0, 0, 0, 1, 0, 0, 2, 0], value=1.0),                   # pads with ones, not zeros
    dict(pads=[0, 0, 0, 1, 0, 0, 2, 0], mode="reflect"),
    dict(pads=[0, 1, 0, 0, 0, 0, 0, 0]),                              # pads a channel, not a spatial axis
    dict(pads=[0, 0, -1, 0, 0, 0, 0, 0]),                             # crops
    dict(pads=[0, 0, 0, 1, 0, 0, 2, 0], second_reader="Relu"),        # another reader sees the padding
])
def test_any_other_pad_is_left_alone(case):
    model = _pad_conv_graph(**case)
    before = model.SerializeToString()
    assert _pads_into_convs(model) == 0
    assert model.SerializeToString() == before


def test_a_convolution_run_on_two_sizes_keeps_its_run_time_padding():
    """Constant pads hold for one input size only: a layer that sees two keeps timm's padding."""
    from timm.layers.conv2d_same import Conv2dSame

    from captioning.deploy.onnx_export import _StaticSame, _static_same

    class TwoScales(torch.nn.Module):
        img_size = 16

        def __init__(self):
            super().__init__()
            self.once, self.twice = Conv2dSame(3, 3, 3, stride=2), Conv2dSame(3, 3, 3, stride=2)

        def forward(self, x):
            return self.twice(self.once(x)).mean() + self.twice(x).mean()

    model = TwoScales()
    static = _static_same(model)
    assert isinstance(static.once, _StaticSame) and isinstance(static.twice, Conv2dSame)
    assert isinstance(model.once, Conv2dSame)  # a copy is changed, not the caller's model
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(static(x), model(x), atol=1e-6)
