"""The runtime dimension: an artifact packed for ONNX Runtime loads into an OrtCaptioner that
evaluation can use as it uses a torch Captioner, and its bad runtime settings fail in one line."""
import copy

import pytest

from captioning.captioner import Captioner, load_captioner, pack_model
from captioning.cli import main
from captioning.compress import artifact
from captioning.deploy.ort_search import OrtCaptioner
from captioning.errors import UserError
from captioning.evaluation.evaluate import count_params
from test_captioner import IMAGES
from small_decoders import image_captioner

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


@pytest.fixture(scope="module")
def cap():
    return image_captioner("updown")  # test_efficientnet: its captions depend on the image


@pytest.fixture(scope="module")
def calibration(cap):
    return cap.images(IMAGES)


def test_fp32_on_onnxruntime_captions_as_torch_does(cap, tmp_path):
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, cap.max_length, runtime="onnxruntime")
    ort = load_captioner(tmp_path / "m.capz")
    torch_cap = load_captioner(tmp_path / "m.capz", runtime="torch")
    assert isinstance(ort, OrtCaptioner) and isinstance(torch_cap, Captioner)
    assert (ort.runtime, torch_cap.runtime, ort.quantization) == ("onnxruntime", "torch", "fp32")
    assert ort.config["runtime"] == {"quantization": "fp32", "engine": "onnxruntime"}
    captions = ort.caption_files(IMAGES, beam_size=3, batch_size=2)
    assert captions == torch_cap.caption_files(IMAGES, beam_size=3) and len(set(captions)) > 1
    assert count_params(ort) == count_params(torch_cap)  # the stored weights, whatever runs them
    assert ort.cpu() is ort


def test_torch_artifact_runs_on_onnxruntime_when_asked(cap, tmp_path):
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, cap.max_length)
    ort = load_captioner(tmp_path / "m.capz", runtime="onnxruntime")
    assert isinstance(ort, OrtCaptioner)
    assert ort.caption_files(IMAGES[:2]) == load_captioner(tmp_path / "m.capz").caption_files(IMAGES[:2])


def test_int8_on_onnxruntime_stores_calibrated_ranges_and_captions(cap, calibration, tmp_path):
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, cap.max_length, quantization="int8",
               runtime="onnxruntime", calibration=calibration)
    ort = load_captioner(tmp_path / "m.capz")
    ranges = ort.config["runtime"]["encoder_ranges"]
    assert isinstance(ort, OrtCaptioner) and ort.quantization == "int8" and len(ranges) > 10
    assert all(lo <= hi for lo, hi in ranges.values())
    assert isinstance(ort.config["runtime"]["encoder_float"], list)  # the units kept float: see test_ort_quantize
    captions = ort.caption_files(IMAGES)
    assert len(captions) == len(IMAGES) and all(isinstance(c, str) for c in captions)
    # the stored weights are the int8 ones either way; the torch path runs them too
    assert count_params(ort) == count_params(load_captioner(tmp_path / "m.capz", runtime="torch"))


def test_cli_caption_runtime_flag(cap, tmp_path, capsys):
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, cap.max_length)
    outs = []
    for runtime in ("torch", "onnxruntime"):
        assert main(["caption", "--model", str(tmp_path / "m.capz"), "--runtime", runtime, *map(str, IMAGES[:2])]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].count("\n") == 2


def test_bad_runtime_settings_are_one_line(cap, calibration, tmp_path):
    m = tmp_path / "m.capz"
    with pytest.raises(UserError, match="fp16 does not run on ONNX Runtime"):
        pack_model(m, cap.encoder, cap.decoder, cap.itow, cap.max_length, quantization="fp16", runtime="onnxruntime")
    with pytest.raises(UserError, match="int8 on ONNX Runtime needs calibration images"):
        pack_model(m, cap.encoder, cap.decoder, cap.itow, cap.max_length, quantization="int8", runtime="onnxruntime")
    with pytest.raises(UserError, match="unknown runtime 'tflite'"):
        pack_model(m, cap.encoder, cap.decoder, cap.itow, cap.max_length, runtime="tflite")
    assert not m.exists()
    pack_model(m, cap.encoder, cap.decoder, cap.itow, cap.max_length, quantization="int8")
    with pytest.raises(UserError, match=r"m\.capz: no calibrated encoder ranges, so int8 cannot run on ONNX Runtime"):
        load_captioner(m, runtime="onnxruntime")
    pack_model(m, cap.encoder, cap.decoder, cap.itow, cap.max_length, quantization="int8", runtime="onnxruntime",
               calibration=calibration)
    config, groups = artifact.read(m)
    name = next(iter(config["runtime"]["encoder_ranges"]))
    for bad, match in [
        ({"engine": "tflite"}, r"unknown runtime 'tflite'"),
        ({"encoder_ranges": [1, 2]}, r"encoder_ranges must be an object"),
        ({"encoder_ranges": {name: [1.0]}}, r"must be \[lo, hi\]"),
        ({"encoder_ranges": {name: [2.0, 1.0]}}, r"must be \[lo, hi\]"),
        ({"encoder_ranges": {name: ["0", 1.0]}}, r"must be \[lo, hi\]"),
        ({"encoder_ranges": {"no_such_tensor": [0.0, 1.0]}}, r"bad\.capz: "),
        ({"encoder_float": "/conv_stem"}, r"encoder_float must be a list of at most 4 unit names"),
        ({"encoder_float": [1]}, r"encoder_float must be a list"),
        ({"encoder_float": ["/x"] * 5}, r"encoder_float must be a list of at most 4"),
        ({"encoder_float": ["/no_such_unit"]}, r"bad\.capz: float units \['/no_such_unit'\] are not convolution units"),
    ]:
        rt = copy.deepcopy(config["runtime"])
        rt.update(bad)
        artifact.pack(tmp_path / "bad.capz", groups, {**config, "runtime": rt})
        with pytest.raises(UserError, match=match) as e:
            load_captioner(tmp_path / "bad.capz")
        assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path / "bad.capz"))

