"""int8 on ONNX Runtime: the encoder statically (QDQ), the decoder's matmuls dynamically.

The encoder is a CNN whose activations have stable ranges, so static quantization pays: every
Conv runs on int8 inputs with no per-call range search. Its activation ranges are calibrated once
(``encoder_ranges``, at pack time, on real training images) and stored in the artifact; at load
time a fresh export of the same model is quantized with them (``quantize_encoder``) without
running a calibration again. Both sides prepare the graph identically (``quant_pre_process``:
shape inference and ORT's basic optimisations, deterministic), so the calibrated tensor names of
one export are the names of the next.

The decoder's activations change every step and hardly repeat between images, so its
MatMul/Gemm weights are quantized dynamically (``quantize_decoder``): activations get their range
at run time, as torch's int8 decoder does. Weights are symmetric per output channel on
[-127, 127], scale = max|row| / 127: the torch int8 grid (``compress.quantize``), so weights
already on it keep their integers; zero points are 0, so pruned weights stay exactly zero.

Activations are unsigned (QUInt8) and weights signed (QInt8), as ORT recommends for x86 CPUs.
On a CPU without VNNI (AVX2 only) ORT's u8×s8 kernels add pairs of products in int16, which
saturates: weights then get 7 bits ([-64, 64], ORT's ``reduce_range``), as ORT advises. Measured
on an AVX2 EPYC: the decoder's int8 log-probabilities were off by up to 0.45 nats with 8-bit
weights and 0.05 with 7-bit; tf_efficientnet_lite0's int8 features 63% off against 36%. The
graphs are quantized where they run (at load), so each CPU gets its own choice.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
PERCENTILE = 99.99  # of each activation's calibration values kept in range (see encoder_ranges)
MAX_FLOAT_UNITS = 4  # encoder units ``float_units`` may keep in float
FLOAT_GAIN = 0.8     # ... each cutting the int8 feature error to at most this fraction


def has_vnni() -> bool:
    """Whether this CPU has an int8 dot-product instruction (AVX512-VNNI or AVX-VNNI); False if unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in _VNNI_FLAGS)


@contextlib.contextmanager
def _quiet_ort():
    """ORT's quantization tools log a warning per call ("consider pre-processing"); they are answered here."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _op_types() -> list[str]:
    """The op types ``quantize_static`` quantizes (and calibrates) by default, as it computes them."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def _prepared(graph: bytes, folder: Path) -> Path:
    """``graph`` after ``quant_pre_process`` (shape inference, basic optimisation), saved in ``folder``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    raw, out = folder / "raw.onnx", folder / "prepared.onnx"
    raw.write_bytes(graph)
    with _quiet_ort():
        quant_pre_process(str(raw), str(out))
    return out


def _shape_arithmetic(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(node names, tensor names) of the graph's arithmetic on tensor shapes: what follows a Shape
    node and reads nothing but shapes and constants. The tf_ EfficientNets' "same" padding
    computes its pad widths that way, in float; quantized, the pads come out wrong (a 4×4 map
    shrinks to 3×3), so these nodes are not quantized and need no range."""
    derived = {i.name for i in model.graph.initializer}  # constants and shape-derived tensors
    shape, nodes = set(), set()
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape" or (all(i in derived for i in inputs) and any(i in shape for i in inputs)):
            nodes.add(node.name)
            shape.update(node.output)
        if node.op_type == "Shape" or all(i in derived for i in inputs):
            derived.update(node.output)
    return nodes, shape


def _needed(prepared: Path) -> set[str]:
    """The tensors whose ranges static quantization of ``prepared`` reads: those ORT's calibrator
    collects (float inputs and outputs of every quantizable node, initializers aside), less the
    shape arithmetic (``_shape_arithmetic``)."""
    from onnxruntime.quantization.calibrate import CalibraterBase

    calibrator = CalibraterBase(prepared, _op_types())
    return calibrator.select_tensors_to_calibrate(calibrator.model)[0] - _shape_arithmetic(calibrator.model)[1]


def encoder_ranges(encoder_graph: bytes, images: np.ndarray) -> dict[str, list[float]]:
    """{tensor: [lo, hi]} of every tensor static quantization of ``encoder_graph`` needs, over
    ``images`` [N, 3, S, S] float32 (normalised as the encoder expects); deterministic.

    Percentile calibration (ORT's ``Percentile``, the central 99.99% of a 2048-bin histogram of
    each tensor, per side): the linear bottleneck outputs of an EfficientNet have long tails
    (min-max ranges of about ±40 for values mostly within a few units), and cutting the last
    0.01% gives them a finer grid. On tf_efficientnet_lite0 (ImageNet weights, 32 crops of 4
    COCO images, 16 crops of a held-out one) it lowered the int8 region features' relative
    error against fp32 from 0.213 to 0.196 and from 0.135 to 0.127 (two splits, 8-bit weights),
    and never raised it; entropy calibration gave min-max's ranges.
    """
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    images = np.ascontiguousarray(images, dtype=np.float32)

    class Reader(CalibrationDataReader):  # one image per run: the graph's batch size does not matter
        def __init__(self):
            self.rows = iter(images)

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {"images": row[None]}

    with tempfile.TemporaryDirectory(prefix="ort_quantize.") as d:
        prepared = _prepared(encoder_graph, Path(d))
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrator prints its progress
            calibrator = create_calibrator(prepared, _op_types(), augmented_model_path=str(Path(d) / "augmented.onnx"),
                                           calibrate_method=CalibrationMethod.Percentile,
                                           extra_options={"percentile": PERCENTILE, "symmetric": False})
            calibrator.collect_data(Reader())
            data = calibrator.compute_data()
        del calibrator  # its session holds the augmented model's file open until then
        needed = _needed(prepared)
    return {name: [np.asarray(x).item() for x in data[name].range_value] for name in sorted(needed)}


class _StaticInt8:
    """Static int8 QDQ of one encoder graph with calibrated activation ``ranges``, prepared once so
    that several choices of float units (``float_units``) cost one ``quantize_static`` each."""

    def __init__(self, encoder_graph: bytes, ranges: dict, folder: Path):
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

        self.folder, self.prepared = folder, _prepared(encoder_graph, folder)
        needed = _needed(self.prepared)
        if not needed <= set(ranges):
            extra, missing = sorted(set(ranges) - needed), sorted(needed - set(ranges))
            raise ValueError(f"encoder ranges do not match the encoder graph: {len(extra)} unknown tensors "
                             f"{extra[:2]}, {len(missing)} missing {missing[:2]}")
        # quantize_static reads precomputed ranges from a calibration cache file: write one
        self.cache = folder / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
            name: (np.float32(lo), np.float32(hi)) for name, (lo, hi) in ranges.items() if name in needed}), self.cache)
        model = onnx.load(self.prepared, load_external_data=False)
        self.shape_nodes = sorted(_shape_arithmetic(model)[0])
        self.units = conv_units(model)

    def __call__(self, float_units=()) -> bytes:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.calibrate import CalibrationMethod

        unknown = [u for u in float_units if u not in self.units]
        if unknown:
            raise ValueError(f"float units {unknown[:2]} are not convolution units of the encoder graph")
        floats = [node for u in float_units for node in self.units[u]]
        out = self.folder / "int8.onnx"
        with _quiet_ort():
            quantize_static(str(self.prepared), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                            nodes_to_exclude=self.shape_nodes + floats,
                            reduce_range=not has_vnni(), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=self.cache)
        return out.read_bytes()


def conv_units(model: onnx.ModelProto) -> dict[str, list[str]]:
    """{unit: its Conv node names}, in graph order. A unit is the module that holds convolutions,
    named by the exporter's scope: ``/blocks/blocks.0/blocks.0.0`` for an EfficientNet block's
    depthwise and pointwise convs (``.../conv_dw/Conv``, ``.../conv_pw/Conv``), ``/conv_stem`` for
    a convolution at the top level; a node with no scope is its own unit. A block's convs share
    their activations' grid, so they are kept in float together (one of them alone can make the
    int8 error worse, measured on lite0)."""
    units: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            parts = node.name.split("/")
            units.setdefault("/".join(parts[:-2]) or "/".join(parts[:-1]) or node.name, []).append(node.name)
    return units


def quantize_encoder(encoder_graph: bytes, ranges: dict, float_units=()) -> bytes:
    """Static int8 QDQ of the encoder with the calibrated activation ``ranges`` (no calibration
    run): per-channel QInt8 weights, QUInt8 activations; the convolutions of ``float_units``
    (``conv_units``; chosen by ``float_units``) stay float. ``ranges`` must name every tensor this
    graph needs, and the units must be the graph's, else ValueError (a foreign artifact). Other
    ranges are ignored: an artifact packed before ``export_encoder`` folded "same" pads into the
    convolutions also lists the pads' outputs."""
    with tempfile.TemporaryDirectory(prefix="ort_quantize.") as d:
        return _StaticInt8(encoder_graph, ranges, Path(d))(float_units)


def _features(graph: bytes, images: np.ndarray) -> np.ndarray:
    """The region features ("att") of ``graph`` for ``images``, one image per run on one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["att"], {"images": row[None]})[0] for row in images])


def float_units(encoder_graph: bytes, ranges: dict, images: np.ndarray, max_units: int = MAX_FLOAT_UNITS,
                gain: float = FLOAT_GAIN) -> list[str]:
    """The convolution units (``conv_units``) to keep in float in the static int8 encoder: a greedy
    search on the calibration ``images`` that keeps in float, one at a time, the unit whose int8
    costs the most, measured as the relative error of the region features against fp32, while
    that cuts the error to at most ``gain`` of what it was, up to ``max_units``. Deterministic.

    Per-tensor activations are int8's weak point in MobileNet-style encoders, depthwise layers
    above all (Krishnamoorthi 2018; Nagel et al. 2019). On tf_efficientnet_lite0 with ImageNet
    weights (64 calibration images, 64 others) the error was 0.30 with every unit int8 and 0.077
    with its first block (``/blocks/blocks.0/blocks.0.0``, 3.3 of its 125 MMACs at 128 px) in
    float; no second unit cut it below 0.075. Three trained decoders over it lost 1.7-3.3% CIDEr
    with the all-int8 encoder and none (+0.1 to +1.0%) with that block in float (README)."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    reference = _features(encoder_graph, images)

    def error(graph: bytes) -> float:
        return float(np.linalg.norm(_features(graph, images) - reference) / max(np.linalg.norm(reference), 1e-12))

    with tempfile.TemporaryDirectory(prefix="ort_quantize.") as d:
        quantize = _StaticInt8(encoder_graph, ranges, Path(d))
        chosen, current = [], error(quantize())
        while len(chosen) < max_units:
            trials = [(error(quantize(chosen + [u])), u) for u in quantize.units if u not in chosen]
            if not trials:
                break
            best, unit = min(trials)
            if best > gain * current:
                break
            chosen, current = chosen + [unit], best
    return chosen


CALIBRATION_FORMAT = "captioning.ort_calibration/1"


def calibrate(encoder_graph: bytes, images: np.ndarray, cache_dir=None) -> tuple[dict, list[str]]:
    """(``encoder_ranges``, ``float_units``) of ``encoder_graph`` on ``images``. With ``cache_dir``,
    once per graph, images, ONNX Runtime version and weight width (VNNI or not, which
    ``quantize_static`` reads): every int8 variant of one encoder packs the same answer, and the
    search is most of a pack's time (lite0: about 35 of 55 s). A cached file that is unreadable or
    not of this format is recomputed."""
    import onnxruntime

    images = np.ascontiguousarray(images, dtype=np.float32)
    path = None
    if cache_dir is not None:
        h = hashlib.sha256(json.dumps([CALIBRATION_FORMAT, onnxruntime.__version__, has_vnni(), PERCENTILE,
                                       MAX_FLOAT_UNITS, FLOAT_GAIN, images.shape]).encode())
        h.update(hashlib.sha256(encoder_graph).digest())
        h.update(images.tobytes())
        path = Path(cache_dir) / f"calibration-{h.hexdigest()}.json"
        try:
            cached = json.loads(path.read_text())
            if (cached.get("format") == CALIBRATION_FORMAT and isinstance(cached.get("ranges"), dict)
                    and isinstance(cached.get("float"), list)):
                return cached["ranges"], cached["float"]
        except (OSError, ValueError, AttributeError):
            pass
    ranges = encoder_ranges(encoder_graph, images)
    units = float_units(encoder_graph, ranges, images)
    if path is not None:
        from ..io import write_json

        write_json(path, {"format": CALIBRATION_FORMAT, "ranges": ranges, "float": units}, indent=None)
    return ranges, units


def _gemm_as_matmul(model: onnx.ModelProto) -> None:
    """Rewrite every Gemm with a constant weight (the exporter's form of a 2-D ``nn.Linear``) as
    MatMul + Add, in place: ORT's dynamic quantization has an int8 kernel for MatMul only."""
    weights = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in weights or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        name = f"{node.input[1]}_matmul"  # a new initializer: a tied weight keeps its other uses
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB") else w),
                                                               name))
        product = node.output[0] + ("_matmul" if len(node.input) > 2 else "")
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], name], [product], f"{node.name}_matmul"))
        if len(node.input) > 2:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], f"{node.name}_add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def quantize_decoder(graph: bytes) -> bytes:
    """Dynamic int8 of an "init" or "step" graph: MatMul/Gemm weights per output channel on the
    torch int8 grid (QInt8, symmetric), activations quantized per call. Matmuls of two activations
    (attention scores) stay float, as in torch's int8 decoder."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load_from_string(graph)
    _gemm_as_matmul(model)
    with tempfile.TemporaryDirectory(prefix="ort_quantize.") as d:
        src, out = Path(d) / "float.onnx", Path(d) / "int8.onnx"
        onnx.save(model, src)
        with _quiet_ort():
            quantize_dynamic(src, out, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=not has_vnni(),
                             weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        return out.read_bytes()


def quantize_graphs(graphs: dict[str, bytes], ranges: dict, float_units=()) -> dict[str, bytes]:
    """The three graphs of ``onnx_export.export_captioner`` in int8: encoder static with the
    calibrated ``ranges`` (``float_units`` in float), init and step dynamic."""
    return {"encoder": quantize_encoder(graphs["encoder"], ranges, float_units),
            "init": quantize_decoder(graphs["init"]), "step": quantize_decoder(graphs["step"])}
