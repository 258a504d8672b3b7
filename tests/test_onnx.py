"""ONNX export and ONNX Runtime captioning give the torch path's captions, in fp32, for every family."""
import numpy as np
import pytest
import torch
from small_decoders import image_captioner

from captioning.data.prepare import decode
from captioning.deploy.onnx_export import export_captioner, names
from captioning.deploy.ort_search import OrtCaptioner, beam_search, greedy, numpy_select, topk
from captioning.models import search as torch_search

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py

IMG, MAX_LEN, WORDS = 64, 12, 20  # 64 px: test_efficientnet gives 2×2 regions, so attention has a choice


def _captioner(family, zeros):
    # dropout on: the graphs must hold the eval-mode model, and exporting must leave the captioner in eval mode
    return image_captioner(family, zeros, dropout=True, prune_encoder=True, img_size=IMG, words=WORDS,
                           max_length=MAX_LEN)


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("zeros", [0.0, 0.65], ids=["dense", "pruned"])
@pytest.mark.parametrize("family", ["updown", "aoanet", "transformer"])
def test_onnx_runtime_captions_equal_torch(family, zeros, images):
    cap = _captioner(family, zeros)
    ort_cap = OrtCaptioner.from_captioner(cap)
    assert not cap.encoder.training and not cap.decoder.training
    with torch.no_grad():
        fc, att = cap.encoder(images)
        ctx = cap.decoder.prepare(fc, att)
        state = cap.decoder.init_state(ctx)
    step = ort_cap.sessions["step"]
    assert [i.name for i in step.get_inputs()] == ["tokens", *names("state", len(state)), *names("ctx", len(ctx))]
    assert [o.name for o in step.get_outputs()] == ["logprobs", *names("new_state", len(state))]

    ort_fc, ort_att = ort_cap.encode(images.numpy())
    np.testing.assert_allclose(ort_fc, fc.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(ort_att, att.numpy(), rtol=0, atol=1e-4)

    # the same tokens through both decoders (torch's greedy caption), so every step is compared
    with torch.no_grad():
        seq = torch_search.greedy(cap.decoder, fc, att, MAX_LEN)
    ort_ctx, ort_state = ort_cap.start(fc.numpy(), att.numpy())
    assert np.array_equal(greedy(ort_cap.step, ort_ctx, ort_state, MAX_LEN), seq.numpy())
    tokens, first = torch.zeros(len(images), dtype=torch.long), None
    for t in range(MAX_LEN):
        with torch.no_grad():
            logprobs, state = cap.decoder.step(tokens, state, ctx)
        ort_logprobs, ort_state = ort_cap.step(tokens.numpy(), ort_state, ort_ctx)
        np.testing.assert_allclose(ort_logprobs, logprobs.numpy(), rtol=0, atol=1e-4)
        first = logprobs if first is None else first
        tokens = seq[:, t]
    assert (first.max(0).values - first.min(0).values).max() > 0.01  # the words depend on the image

    for beam in (1, 3):
        assert ort_cap.caption_images(images, beam) == cap.caption_images(images, beam)


@pytest.mark.parametrize("family", ["updown", "aoanet", "transformer"])
def test_decoder_graphs_have_no_control_flow(family):
    """A step runs at every word, and an If there (torch's squeeze of a dim the exporter cannot see
    is 1) costs a subgraph call each time: the set-up and step graphs are straight-line."""
    import onnx

    graphs = export_captioner(_captioner(family, 0.0))
    for name in ("init", "step"):
        ops = {n.op_type for n in onnx.load_from_string(graphs[name]).graph.node}
        assert not ops & {"If", "Loop", "Scan"}, (name, ops)


def test_onnx_runtime_takes_numpy_images_and_several_threads(images):
    cap = _captioner("updown", 0.0)
    assert OrtCaptioner.from_captioner(cap, threads=2).caption_images(images.numpy()) == cap.caption_images(images)


def test_captioning_is_one_session_and_its_parts_caption_alike(images):
    ort_cap = OrtCaptioner.from_captioner(_captioner("updown", 0.0))
    assert set(ort_cap.sessions) == {"captioner"}
    captions = ort_cap.caption_images(images, 3)
    assert set(ort_cap.sessions) == {"captioner"}  # the joined graph: encoder, set-up and search
    ctx, state = ort_cap.start(*ort_cap.encode(images.numpy()))
    seq = ort_cap.search(ctx, state, 3)
    assert [decode(ort_cap.itow, s) for s in seq.tolist()] == captions
    logprobs, _ = ort_cap.step(np.zeros(len(images), dtype=np.int64), state, ctx)
    assert logprobs.shape == (len(images), WORDS + 1)
    assert set(ort_cap.sessions) == {"captioner", "encoder", "init", "search", "step"}


class _Markov:
    """A stand-in decoder: the next word depends on the last one and the image, and the end token
    grows likelier at every step, so captions end at every length (random decoders end at once or never)."""

    def __init__(self, seed: int, words: int = 9):
        self.table = torch.randn(words + 1, words + 1, generator=torch.Generator().manual_seed(seed)) * 2

    def prepare(self, fc, att):
        return (fc[:, :self.table.shape[1]] + att.mean(1)[:, :self.table.shape[1]],)

    def init_state(self, ctx):
        return (torch.zeros(ctx[0].shape[0]),)

    def step(self, tokens, state, ctx):
        logits = self.table[tokens] + ctx[0]
        logits[:, 0] += state[0] - 4  # the end token: unlikely at first, likely after a few words
        return torch.log_softmax(logits, 1), (state[0] + 1,)


def _numpy_step(decoder):
    """A torch decoder's step on numpy arrays: the search logic alone, without ONNX."""
    def step(tokens, state, ctx):
        logprobs, state = decoder.step(torch.from_numpy(tokens), tuple(map(torch.from_numpy, state)),
                                       tuple(map(torch.from_numpy, ctx)))
        return logprobs.numpy(), tuple(s.numpy() for s in state)
    return step


@pytest.mark.parametrize("seed", range(3))
def test_numpy_search_equals_torch_search(seed):
    g = torch.Generator().manual_seed(seed)
    fc, att = torch.randn(16, 12, generator=g), torch.randn(16, 3, 12, generator=g)
    dec, max_len = _Markov(seed), 8
    ctx = dec.prepare(fc, att)
    ctx_np, state_np = tuple(c.numpy() for c in ctx), tuple(s.numpy() for s in dec.init_state(ctx))
    first = greedy(_numpy_step(dec), ctx_np, state_np, max_len)
    assert np.array_equal(first, torch_search.greedy(dec, fc, att, max_len).numpy())
    lengths = set((first != 0).sum(1).tolist())
    for beam in (1, 2, 3, 5):
        want = torch_search.beam_search(dec, fc, att, beam, max_len).numpy()
        assert np.array_equal(beam_search(numpy_select(_numpy_step(dec)), ctx_np, state_np, beam, max_len), want), beam
        lengths |= set((want != 0).sum(1).tolist())
        assert (beam == 1) == np.array_equal(want, first)  # beam 1 is greedy; wider beams find other captions
    assert len(lengths) >= 3 and max_len in lengths  # captions of several lengths, some cut at max_length


def test_topk_breaks_ties_by_lower_index():
    scores, ix = topk(np.array([[0.0, 1.0, 1.0, -np.inf, 1.0]], dtype=np.float32), 2)
    assert ix.tolist() == [[1, 2]] and scores.tolist() == [[1.0, 1.0]]



@pytest.mark.parametrize("k", [3, 9])
def test_topk_ranks_nan_as_inf(k):
    """A model that emits NaN still gets a caption: NaN ranks as +inf (torch.topk's order), ties by lower index."""
    x = np.random.default_rng(0).standard_normal((4, 30)).astype(np.float32)
    x[2, [7, 20]] = np.nan
    x[2, 3] = np.inf
    scores, ix = topk(x, k)
    assert ix[2, :3].tolist() == [3, 7, 20]
    assert np.isnan(scores[2, 1:3]).all() and scores[2, 0] == np.inf
    clean = np.delete(x, 2, axis=0)
    assert np.array_equal(np.delete(ix, 2, axis=0), np.argsort(-clean, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("k", [1, 3, 8, 9])
def test_topk_is_a_stable_descending_sort_cut_at_k(k):
    """Both paths (arg-max passes, partition) give the stable sort's first k: ties, -inf rows, few candidates."""
    rng = np.random.default_rng(k)
    x = rng.integers(-3, 3, size=(6, 40)).astype(np.float32)  # many ties
    x[1, 5:] = -np.inf              # fewer finite values than k=9
    x[2] = -np.inf                  # nothing finite: the first k indices
    x[3, ::2] = -np.inf
    want = np.argsort(-x, axis=1, kind="stable")[:, :k]
    for rows in (x, x[:1], x[4:]):  # batches that take the arg-max path and batches that fall back
        scores, ix = topk(rows, k)
        ref = np.argsort(-rows, axis=1, kind="stable")[:, :k]
        assert ix.tolist() == ref.tolist()
        assert np.array_equal(scores, np.take_along_axis(rows, ref, 1))
    assert topk(x, k)[1].tolist() == want.tolist()

def _passthrough_step() -> bytes:
    """A stand-in step graph: logprobs = ctx_0 (fed as is), new_state_0 = state_0 + tokens, new_state_1 = state_1."""
    import onnx
    from onnx import TensorProto, helper

    f, i = TensorProto.FLOAT, TensorProto.INT64
    nodes = [helper.make_node("Identity", ["ctx_0"], ["logprobs"]),
             helper.make_node("Cast", ["tokens"], ["tokens_f"], to=f),
             helper.make_node("Unsqueeze", ["tokens_f", "axis1"], ["tokens_col"]),
             helper.make_node("Add", ["state_0", "tokens_col"], ["new_state_0"]),
             helper.make_node("Identity", ["state_1"], ["new_state_1"])]
    graph = helper.make_graph(
        nodes, "step",
        [helper.make_tensor_value_info("tokens", i, ["batch"]), helper.make_tensor_value_info("state_0", f, ["batch", 2]),
         helper.make_tensor_value_info("state_1", f, ["batch", "t", 3]),
         helper.make_tensor_value_info("ctx_0", f, ["batch", "words"])],
        [helper.make_tensor_value_info("logprobs", f, ["batch", "words"]),
         helper.make_tensor_value_info("new_state_0", f, ["batch", 2]),
         helper.make_tensor_value_info("new_state_1", f, ["batch", "t", 3])],
        [onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("K", [1, 3, 5])
def test_beam_step_graph_selects_as_numpy(K):
    """The selection appended to the step graph gives numpy_select's scores, beams, words and reordered
    states, bit for bit: ties (lower index first), -inf beams, NaN (ranked as +inf, returned as NaN)."""
    import onnxruntime as ort

    from captioning.deploy.beam_step import beam_step_graph

    step = _passthrough_step()
    plain = ort.InferenceSession(step, providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(beam_step_graph(step), providers=["CPUExecutionProvider"])

    def numpy_step(tokens, state, ctx):
        logprobs, *new = plain.run(None, {"tokens": tokens, "state_0": state[0], "state_1": state[1], "ctx_0": ctx[0]})
        return logprobs, tuple(new)

    rng = np.random.default_rng(K)
    B, V1 = 4, 7
    for trial in range(20):
        logprobs = rng.integers(-4, 1, size=(B * K, V1)).astype(np.float32)  # many ties
        scores = rng.integers(-3, 1, size=(B, K)).astype(np.float32)
        if trial % 2:
            scores[:, 1:] = -np.inf                       # the first step: one live beam per image
            scores[1] = -np.inf                           # an image with no live beam
        if trial % 3 == 0:
            logprobs[rng.integers(B * K), rng.integers(V1, size=2)] = np.nan
            logprobs[rng.integers(B * K), rng.integers(V1)] = np.inf
        tokens = rng.integers(V1, size=B * K).astype(np.int64)
        state = (rng.standard_normal((B * K, 2)).astype(np.float32),
                 rng.standard_normal((B * K, trial % 4 + 1, 3)).astype(np.float32))
        with np.errstate(invalid="ignore"):  # -inf + inf
            want = numpy_select(numpy_step)(tokens, state, (logprobs,), scores)
        got = fused.run(None, {"tokens": tokens, "state_0": state[0], "state_1": state[1], "ctx_0": logprobs,
                               "scores": scores})
        for w, g in zip((*want[:3], *want[3]), got):
            np.testing.assert_array_equal(g, w)  # NaN where NaN, bit-equal elsewhere


def test_beam_step_graph_refuses_what_is_not_a_step_graph():
    from captioning.deploy.beam_step import beam_step_graph

    with pytest.raises(ValueError, match="not a step graph"):
        beam_step_graph(beam_step_graph(_passthrough_step()))  # its outputs are a beam step's now
