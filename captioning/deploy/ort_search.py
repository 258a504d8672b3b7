"""Captioning with ONNX Runtime: the exported graphs, with greedy and beam search in numpy and in a graph.

``greedy`` and ``beam_search`` are ``captioning.models.search``'s, line for line, on numpy arrays:
same float32 score sums, same end-token rules, same early stop, same stable merge of finished
hypotheses. One difference cannot be copied: which of two exactly equal scores ``torch.topk`` puts
first is unspecified (on CPU it depends on the tensor's size), so here the lower index wins. With
real weights, different words almost never get exactly equal float32 scores, so the captions match
the torch path's. ``OrtCaptioner`` captions with ``search_graph``, the same beam search as ONNX
nodes, joined to the encoder and the decoder set-up (``captioner_graph``: one runtime call per
batch of images); the numpy one is its reference in tests and benchmarks.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Arrays = tuple[np.ndarray, ...]
Step = Callable[[np.ndarray, Arrays, Arrays], tuple[np.ndarray, Arrays]]
# (tokens, state, ctx, live scores [B, K]) -> (scores, beams, words [B, K], states reordered to the beams)
Select = Callable[[np.ndarray, Arrays, Arrays, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, Arrays]]
SCAN_K = 8  # widest beam whose top-k is found by repeated arg-max (see ``topk``)


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values of each row of ``x`` [B, n] and their indices, best first; ties: lower index first.

    A beam is a few wide: ``k`` arg-max passes (each takes the first maximum, so ties go to the lower
    index) cost a fraction of one partition over ``n`` (measured at 3 × 9,488 COCO words: 19 against
    300 µs; at the first step, when 2 of 3 beams are -inf, 3.6 ms). Where a row's k-th value is
    -inf (fewer than ``k`` candidates), or x holds NaN, or the beam is wider than ``SCAN_K``, the
    partition path orders equal values the same way. NaN ranks as +inf, so a model that emits NaN
    still gets a caption, as torch.topk gives it one.
    """
    B = x.shape[0]
    if k <= SCAN_K:
        rows, rest = np.arange(B), x.copy()
        ix = np.empty((B, k), dtype=np.int64)
        for j in range(k):
            ix[:, j] = rest.argmax(1)
            rest[rows, ix[:, j]] = -np.inf
        values = x[rows[:, None], ix]
        # checked on the k picks, not on x: a pass that took -inf may have taken it twice, and a row
        # holding NaN has one first (arg-max takes the first NaN)
        if values[:, -1].min() > -np.inf and not np.isnan(values[:, 0]).any():
            return values, ix
    n = x.shape[1]
    ix = np.empty((B, k), dtype=np.int64)
    for b, row in enumerate(np.where(np.isnan(x), np.inf, x)):
        cand = np.flatnonzero(row >= np.partition(row, n - k)[n - k])  # every tie at the k-th value, ascending
        ix[b] = cand[np.argsort(-row[cand], kind="stable")[:k]]
    return np.take_along_axis(x, ix, 1), ix


def greedy(step: Step, ctx: Arrays, state: Arrays, max_length: int) -> np.ndarray:
    """The arg-max word at every step; captions [B, max_length], 0-padded after the end token."""
    B = ctx[0].shape[0]
    tokens = np.zeros(B, dtype=np.int64)
    seq = np.zeros((B, max_length), dtype=np.int64)
    alive = np.ones(B, dtype=bool)
    for t in range(max_length):
        logprobs, state = step(tokens, state, ctx)
        tokens = logprobs.argmax(1) * alive  # first maximum: topk(1)'s order, see the module docstring
        seq[:, t] = tokens
        alive &= tokens != 0
        if not alive.any():
            break
    return seq


def numpy_select(step: Step) -> Select:
    """A beam step in numpy around ``step``: its log-probabilities, the best ``K`` continuations of each
    image's ``K`` beams (``topk``), and the states reordered to follow them. ``OrtCaptioner.select``
    runs the same in one ONNX Runtime call (``captioning.deploy.beam_step``)."""
    def select(tokens: np.ndarray, state: Arrays, ctx: Arrays, scores: np.ndarray):
        logprobs, state = step(tokens, state, ctx)
        (B, K), V1 = scores.shape, logprobs.shape[1]
        cand = (scores[:, :, None] + logprobs.astype(np.float32, copy=False).reshape(B, K, V1)).reshape(B, K * V1)
        score, ix = topk(cand, K)
        beam, word = np.divmod(ix, V1)
        src = (beam + np.arange(B)[:, None] * K).reshape(-1)  # image i's beams are rows i*K .. i*K+K-1
        return score, beam, word, tuple(s.take(src, axis=0) for s in state)
    return select


def beam_search(select: Select, ctx: Arrays, state: Arrays, beam_size: int, max_length: int) -> np.ndarray:
    """The best finished caption per image [B, max_length]; ``ctx`` and ``state`` hold one row per image.

    As ``captioning.models.search.beam_search``: summed log-probabilities, no length penalty, a beam
    that emits the end token finishes, the survivors finish at ``max_length``, and the search stops
    once no live beam can beat the finished ones. ``select`` is a beam step: ``numpy_select(step)``,
    or ``OrtCaptioner.select``.
    """
    B, K = ctx[0].shape[0], beam_size
    ctx = tuple(np.repeat(c, K, axis=0) for c in ctx)      # row i -> rows i*K .. i*K+K-1
    state = tuple(np.repeat(s, K, axis=0) for s in state)  # the decoder's init_state is per row
    tokens = np.zeros(B * K, dtype=np.int64)
    neg_inf = np.float32(-np.inf)

    live_seq = np.zeros((B, K, max_length), dtype=np.int64)
    live_score = np.full((B, K), neg_inf, dtype=np.float32)
    live_score[:, 0] = 0.0                                   # all K beams start identical: keep one
    done_seq = np.zeros((B, K, max_length), dtype=np.int64)
    done_score = np.full((B, K), neg_inf, dtype=np.float32)
    rows = np.arange(B)[:, None]

    for t in range(max_length):
        score, beam, word, state = select(tokens, state, ctx, live_score)
        live_seq = live_seq[rows, beam]
        live_seq[:, :, t] = word

        ended = word == 0 if t < max_length - 1 else np.ones_like(word, dtype=bool)
        if ended.any():  # most steps end no beam: nothing to merge
            merged = np.concatenate([done_score, np.where(ended, score, neg_inf)], 1)
            # descending, ties keep their order; NaN ranks as +inf (torch.sort's order: see topk)
            order = np.argsort(-np.where(np.isnan(merged), np.inf, merged), axis=1, kind="stable")[:, :K]
            done_score = merged[rows, order]
            done_seq = np.concatenate([done_seq, live_seq], 1)[rows, order]
            score = np.where(ended, neg_inf, score)

        live_score = score
        if (live_score.max(1) <= done_score[:, -1]).all():
            break
        tokens = word.reshape(-1)
    return done_seq[:, 0]


MAX_RANGES = 100_000  # calibrated tensors an artifact may list; lite0 needs a few hundred
MAX_UNIT_CHARS = 1_000  # the length of a float unit's name (``ort_quantize.conv_units``)


class OrtCaptioner:
    """A captioner on ONNX Runtime: images in, caption strings out, no torch in the decoding loop.

    ``graphs`` holds the three ONNX models of ``captioning.deploy.onnx_export`` ("encoder",
    "init", "step") as bytes; beam search runs as one graph, a Loop over the step with its selection
    appended (``captioning.deploy.search_graph``, ``beam_step``), joined to the encoder and the set-up
    (``captioner_graph``), so a batch of images is one runtime call. One thread by default, as the
    project measures latency.
    Built from a torch ``Captioner`` (``from_captioner``, ``from_artifact``), it also answers what
    evaluation asks of a captioner (``images``, ``caption_files``, ``state_groups``, ``config``):
    image files are read and resized by the torch captioner's encoder settings, and the weights
    it reports are the artifact's stored ones.
    """

    runtime = "onnxruntime"

    def __init__(self, graphs: dict, itow: dict[int, str], max_length: int, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        self.sessions = _Sessions(graphs, options, max_length)
        self.itow, self.max_length = itow, max_length
        self.torch, self.quantization, self.config, self.source = None, "fp32", {}, "onnxruntime"
        self.device = "cpu"

    @classmethod
    def from_captioner(cls, captioner, threads: int = 1) -> "OrtCaptioner":
        """Export a float torch ``Captioner`` in memory and load its graphs."""
        from .onnx_export import export_captioner

        ort = cls(export_captioner(captioner), captioner.itow, captioner.max_length, threads)
        ort.torch = captioner
        return ort

    @classmethod
    def from_artifact(cls, captioner, mode: str, ranges, threads: int = 1, float_units=()) -> "OrtCaptioner":
        """The graphs of a loaded artifact (``captioner``: its stored weights, computing in float),
        computing in ``mode`` (``artifact_graphs``)."""
        ort = cls(artifact_graphs(captioner, mode, ranges, float_units), captioner.itow, captioner.max_length, threads)
        ort.torch, ort.quantization, ort.config, ort.source = captioner, mode, captioner.config, captioner.source
        return ort

    def images(self, paths):
        """Image files as the encoder takes them (see ``captioning.captioner.encoder_images``)."""
        from ..data.images import encoder_images

        return encoder_images(self.torch.encoder, paths)

    def caption_files(self, paths, beam_size: int = 3, batch_size: int = 16) -> list[str]:
        from ..utils import caption_in_batches

        return caption_in_batches(self, paths, beam_size, batch_size)

    def state_groups(self) -> dict:
        """The weights as the artifact stores them (float view), as ``Captioner.state_groups``."""
        return self.torch.state_groups()

    def cpu(self) -> "OrtCaptioner":
        return self  # the CPU execution provider only

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[name].run(None, {n: feeds[n] for n in self.sessions.inputs[name]})

    def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images [B, 3, S, S] (numpy or torch, normalised as the encoder expects) -> (fc, att)."""
        images = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        fc, att = self._run("encoder", {"images": images})
        return fc, att

    def start(self, fc: np.ndarray, att: np.ndarray) -> tuple[Arrays, Arrays]:
        """(ctx, state) before the first word, one row per image."""
        out = self._run("init", {"fc": fc, "att": att})
        n_ctx = sum(o.name.startswith("ctx_") for o in self.sessions["init"].get_outputs())
        return tuple(out[:n_ctx]), tuple(out[n_ctx:])

    def step(self, tokens: np.ndarray, state: Arrays, ctx: Arrays) -> tuple[np.ndarray, Arrays]:
        """One decoder step: tokens [B] int64 -> (logprobs [B, V+1], new state)."""
        feeds = {"tokens": tokens, **{f"state_{i}": s for i, s in enumerate(state)},
                 **{f"ctx_{i}": c for i, c in enumerate(ctx)}}
        logprobs, *state = self._run("step", feeds)
        return logprobs, tuple(state)

    def select(self, tokens: np.ndarray, state: Arrays, ctx: Arrays, scores: np.ndarray):
        """One beam step in one call: as ``numpy_select(self.step)``, (scores, beams, words, reordered state)."""
        feeds = {"tokens": tokens, "scores": scores, **{f"state_{i}": s for i, s in enumerate(state)},
                 **{f"ctx_{i}": c for i, c in enumerate(ctx)}}
        score, beam, word, *state = self._run("beam", feeds)
        return score, beam, word, tuple(state)

    def caption_images(self, images, beam_size: int = 3) -> list[str]:
        """Captions as ``Captioner.caption_images`` gives them (beam search; beam 1 is greedy): one
        runtime call, ``captioner_graph`` (as ``self.search(*self.start(*self.encode(images)), beam_size)``)."""
        from ..data.prepare import decode
        from .search_graph import BEAM_SIZE

        images = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        seq = self._run("captioner", {"images": images, BEAM_SIZE: np.array(beam_size, dtype=np.int64)})[0]
        return [decode(self.itow, s) for s in seq.tolist()]

    def search(self, ctx: Arrays, state: Arrays, beam_size: int) -> np.ndarray:
        """``beam_search(self.select, ctx, state, beam_size, max_length)`` in one runtime call: the search graph."""
        from .search_graph import BEAM_SIZE

        feeds = {**{f"image_ctx_{i}": c for i, c in enumerate(ctx)}, **{f"image_state_{i}": s for i, s in enumerate(state)},
                 BEAM_SIZE: np.array(beam_size, dtype=np.int64)}
        return self._run("search", feeds)[0]


class _Sessions(dict):
    """ONNX Runtime sessions by graph name, each made on first use. Captioning needs one, the joined
    ``captioner`` graph; the parts' sessions (encoder, init, search, the plain step and the beam step)
    load only when asked for (``encode``, ``start``, ``search``, ``step``, ``select``: benchmarks,
    greedy parity tests), so a captioning session holds the weights once. The encoder, init and step
    graphs' bytes stay in memory for those (``graph``: every other graph is built from them), about
    the model's size again (measured for lite0 Up-Down: +8 MiB in int8, +80 MiB in fp32)."""

    def __init__(self, graphs: dict, options, max_length: int):
        super().__init__()
        self.graphs = {name: graphs[name] for name in ("encoder", "init", "step")}
        self.options, self.max_length, self.inputs = options, max_length, {}
        self.__missing__("captioner")  # a bad graph fails at load, not at the first caption

    def graph(self, name: str) -> bytes:
        """The graph ``name``: encoder, init, step, beam (``beam_step_graph``), search
        (``search_graph``) or captioner (``captioner_graph``: encoder -> init -> search)."""
        from .beam_step import beam_step_graph
        from .captioner_graph import captioner_graph
        from .search_graph import search_graph

        if name == "beam":
            return beam_step_graph(self.graphs["step"])
        if name == "search":
            return search_graph(self.graph("beam"), self.max_length)
        if name == "captioner":
            return captioner_graph(self.graphs["encoder"], self.graphs["init"], self.graph("search"))
        return self.graphs[name]

    def __missing__(self, name: str):
        import onnxruntime as ort

        session = self[name] = ort.InferenceSession(self.graph(name), self.options, providers=["CPUExecutionProvider"])
        # a graph drops inputs it does not use (the Transformer's init ignores fc); asked once, not per step
        self.inputs[name] = [i.name for i in session.get_inputs()]
        return session


def artifact_graphs(captioner, mode: str, ranges, float_units=()) -> dict[str, bytes]:
    """The encoder, init and step graphs of a loaded artifact (``captioner``: its stored weights,
    computing in float) in ``mode``: int8 quantizes the encoder statically with the artifact's
    calibrated activation ``ranges``, its ``float_units`` left float (none in an artifact packed
    before they were chosen), and the decoder's matmuls dynamically."""
    from ..errors import UserError
    from .onnx_export import export_captioner

    graphs = export_captioner(captioner)
    if mode == "int8":
        from .ort_quantize import quantize_graphs

        try:
            graphs = quantize_graphs(graphs, _checked_ranges(ranges, captioner.source),
                                     _checked_units(float_units, captioner.source))
        except ValueError as e:
            raise UserError(f"{captioner.source}: {str(e).strip().splitlines()[0]}") from None
    return graphs


def _checked_ranges(ranges, where: str) -> dict[str, list[float]]:
    """An artifact's calibrated activation ranges, {tensor: [lo, hi]} with finite lo <= hi, or a one-line UserError."""
    from ..errors import UserError

    if ranges is None:
        raise UserError(f"{where}: no calibrated encoder ranges, so int8 cannot run on ONNX Runtime "
                        "(pack it with --runtime onnxruntime)")
    if not isinstance(ranges, dict) or len(ranges) > MAX_RANGES:
        raise UserError(f"{where}: runtime.encoder_ranges must be an object of at most {MAX_RANGES} tensors")
    for name, r in ranges.items():
        ok = (isinstance(r, list) and len(r) == 2
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in r))
        if not ok or r[0] > r[1]:
            raise UserError(f"{where}: runtime.encoder_ranges[{name!r}] must be [lo, hi], finite, lo <= hi; got {r!r}")
    return ranges


def _checked_units(units, where: str) -> list[str]:
    """An artifact's float encoder units: a list of at most ``MAX_FLOAT_UNITS`` short names, or a one-line UserError
    (whether the graph has them is ``quantize_encoder``'s check)."""
    from ..errors import UserError
    from .ort_quantize import MAX_FLOAT_UNITS

    ok = (isinstance(units, (list, tuple)) and len(units) <= MAX_FLOAT_UNITS
          and all(isinstance(u, str) and 0 < len(u) <= MAX_UNIT_CHARS for u in units))
    if not ok:
        raise UserError(f"{where}: runtime.encoder_float must be a list of at most {MAX_FLOAT_UNITS} unit names")
    return list(units)
