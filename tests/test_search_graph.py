"""The beam search as one ONNX graph gives ort_search.beam_search's captions, token for token."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from captioning.deploy.beam_step import beam_step_graph
from captioning.deploy.ort_search import beam_search, numpy_select
from captioning.deploy.search_graph import search_graph

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS1, MAX_LEN = 10, 8  # classes (0 = end) and caption length


def _markov_step(seed: int, nan: bool = False) -> bytes:
    """A stand-in step graph whose next word depends on the last word and the image (ctx_0), and whose
    end token grows likelier with the number of words so far, so captions end at every length. That
    number is the length of a growing state, as the Transformer reads its position off its key/value
    cache: state_0 [B, t, 1] starts empty and gains a row per step. state_1 [B, 2] counts too. It reads
    the image through a node that gives the same tensor at every step, as attention's keys do. With
    ``nan``, words 3 and 6 are followed by NaN log-probabilities (all of them, through the softmax),
    as a broken model would give."""
    f, i = TensorProto.FLOAT, TensorProto.INT64
    table = np.random.default_rng(seed).standard_normal((WORDS1, WORDS1)).astype(np.float32) * 2
    if nan:
        table[[3, 6], 5] = np.nan
    consts = {"table": table, "end": np.eye(WORDS1, dtype=np.float32)[0], "four": np.float32(4),
              "axis12": np.array([1, 2], np.int64), "one": np.float32(1)}
    nodes = [helper.make_node("Gather", ["table", "tokens"], ["rows"], axis=0),
             helper.make_node("Shape", ["state_0"], ["t"], start=1, end=2),
             helper.make_node("Cast", ["t"], ["t_f"], to=f),
             helper.make_node("Sub", ["t_f", "four"], ["late"]),
             helper.make_node("Mul", ["late", "end"], ["end_bias"]),
             helper.make_node("Mul", ["ctx_0", "one"], ["ctx_view"]),  # the same every step: search_graph hoists it
             helper.make_node("Add", ["rows", "ctx_view"], ["logits0"]),
             helper.make_node("Add", ["logits0", "end_bias"], ["logits"]),
             helper.make_node("LogSoftmax", ["logits"], ["logprobs"], axis=1),
             helper.make_node("Cast", ["tokens"], ["tokens_f"], to=f),
             helper.make_node("Unsqueeze", ["tokens_f", "axis12"], ["token_row"]),
             helper.make_node("Concat", ["state_0", "token_row"], ["new_state_0"], axis=1),
             helper.make_node("Add", ["state_1", "one"], ["new_state_1"])]
    graph = helper.make_graph(
        nodes, "step",
        [helper.make_tensor_value_info("tokens", i, ["batch"]),
         helper.make_tensor_value_info("state_0", f, ["batch", "t", 1]),
         helper.make_tensor_value_info("state_1", f, ["batch", 2]),
         helper.make_tensor_value_info("ctx_0", f, ["batch", WORDS1])],
        [helper.make_tensor_value_info("logprobs", f, ["batch", WORDS1]),
         helper.make_tensor_value_info("new_state_0", f, ["batch", "t1", 1]),
         helper.make_tensor_value_info("new_state_1", f, ["batch", 2])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan"])
@pytest.mark.parametrize("seed", range(3))
def test_search_graph_gives_the_numpy_search_captions(seed, nan):
    """Every image's caption, at beams 1 to 12 (wider than the vocabulary): finished beams merged at
    several lengths, captions cut at max_length, the early stop, a state that grows from empty,
    batches of one and of many, and NaN scores (ranked as +inf by both)."""
    step = _markov_step(seed, nan)
    plain = ort.InferenceSession(step, providers=["CPUExecutionProvider"])
    search = ort.InferenceSession(search_graph(beam_step_graph(step), MAX_LEN), providers=["CPUExecutionProvider"])

    def numpy_step(tokens, state, ctx):
        logprobs, *new = plain.run(None, {"tokens": tokens, "state_0": state[0], "state_1": state[1], "ctx_0": ctx[0]})
        return logprobs, tuple(new)

    rng = np.random.default_rng(seed)
    B = 12
    ctx = (rng.standard_normal((B, WORDS1)).astype(np.float32),)
    state = (np.zeros((B, 0, 1), np.float32), rng.standard_normal((B, 2)).astype(np.float32))
    lengths, pairs = set(), set()
    for K in (1, 2, 3, 5, 12):
        with np.errstate(invalid="ignore"):  # NaN compared
            want = beam_search(numpy_select(numpy_step), ctx, state, K, MAX_LEN)
        for rows in (slice(None), slice(4, 5)):
            got, = search.run(None, {"image_ctx_0": ctx[0][rows], "image_state_0": state[0][rows],
                                     "image_state_1": state[1][rows], "beam_size": np.array(K, np.int64)})
            assert got.dtype == np.int64 and got.shape == want[rows].shape
            assert np.array_equal(got, want[rows]), (K, rows)
        lengths |= set((want != 0).sum(1).tolist())
        pairs |= {(a, b) for row in want.tolist() for a, b in zip(row, row[1:])}
    if nan:  # after word 3 or 6 every next word scores NaN, ranked +inf, so the first (the end token) wins
        after = {b for a, b in pairs if a in (3, 6)}
        assert after == {0}
    else:
        assert len(lengths) >= 3 and MAX_LEN in lengths


def test_search_graph_refuses_what_is_not_a_beam_step():
    with pytest.raises(ValueError, match="not a beam step graph"):
        search_graph(_markov_step(0), MAX_LEN)  # a plain step: no selection appended


def test_search_graph_is_a_valid_onnx_model_with_named_io():
    model = onnx.load_from_string(search_graph(beam_step_graph(_markov_step(0)), MAX_LEN))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image_state_0", "image_state_1", "image_ctx_0", "beam_size"]
    assert [o.name for o in model.graph.output] == ["seq"]


def test_search_graph_computes_once_what_every_step_computes_alike():
    """Nodes that read only the image's rows and constants, and the shapes of what the loop keeps the
    shape of (the beam scores), run before the loop, not at every word; what varies stays in it."""
    model = onnx.load_from_string(search_graph(beam_step_graph(_markov_step(0)), MAX_LEN))
    loop, = (n for n in model.graph.node if n.op_type == "Loop")
    body = loop.attribute[0].g
    read = lambda nodes: {i for n in nodes for i in n.input}  # noqa: E731
    assert "ctx_0" not in read(body.node) and "ctx_0" in read(model.graph.node)
    assert "scores" not in {n.input[0] for n in body.node if n.op_type == "Shape"}
    assert {"Range", "Mul"} <= {n.op_type for n in model.graph.node}  # the selection's row offsets and ctx_view
    assert {"Gather", "LogSoftmax", "TopK", "Concat"} <= {n.op_type for n in body.node}
    assert not {t.name for t in body.initializer} - read(body.node)  # constants only the hoisted nodes read left too
