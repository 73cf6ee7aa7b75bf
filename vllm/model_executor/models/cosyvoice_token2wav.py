# SPDX-License-Identifier: Apache-2.0
"""CosyVoice2/3 token2wav: speech tokens -> 24 kHz waveform (flow + HiFT).

Loads a CosyVoice2 release directory as released (``cosyvoice2.yaml``,
``flow.pt``, ``hift.pt``) and reproduces the original ``CosyVoice2Model``
token2wav, offline and streaming (token hop 25 with the prompt padded to a
multiple of it, ``pre_lookahead_len`` look-ahead tokens, an 8-frame mel /
3840-sample source cache and a Hamming cross-fade between chunks).

:class:`CosyVoice3Token2Wav` does the same for a CosyVoice3 release
(``cosyvoice3.yaml``: DiT flow, causal HiFT) as ``CosyVoice3Model``: each
streaming chunk re-renders the whole mel accumulated so far with the causal
vocoder and returns only the samples not returned before (no cross-fade),
and the token hop grows 25 -> 50 -> 100 within a session.

Plain torch, no engine dependency: meant to run in the API server process.
The yaml is read without executing any of its tags (``!new:``, ``!name:``,
``!apply:`` are read as plain data; ``!ref <key>`` and simple arithmetic on
references are resolved).
"""

import ast
import dataclasses
import math
import operator
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from vllm.logger import init_logger
from vllm.model_executor.models.cosyvoice3_flow import (
    CausalMaskedDiffWithDiT,
    CosyVoice3FlowConfig,
    load_flow3,
    release_rng_after_flow,
)
from vllm.model_executor.models.cosyvoice_flow import (
    CausalMaskedDiffWithXvec,
    CosyVoiceFlowConfig,
    load_flow,
)
from vllm.model_executor.models.cosyvoice_hift import (
    CausalHiFTConfig,
    CausalHiFTGenerator,
    HiFTConfig,
    HiFTGenerator,
    load_causal_hift,
    load_hift,
)

logger = init_logger(__name__)


# -------------------------------------------------------------- yaml ------
class _Ref:
    def __init__(self, expr: str):
        self.expr = expr


class _TagIgnoringLoader(yaml.SafeLoader):
    """SafeLoader that reads hyperpyyaml tags as plain data."""


def _construct_tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    value = loader.construct_scalar(node)
    if tag_suffix == "ref" or tag_suffix.startswith("ref:"):
        return _Ref(str(value))
    return value


_TagIgnoringLoader.add_multi_constructor("!", _construct_tagged)

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}


def _eval_arith(expr: str) -> int | float:
    """Evaluate + - * / // on numbers only."""

    def ev(n: ast.AST) -> int | float:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        raise ValueError(f"unsupported expression {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def _resolve(node: Any, root: Mapping[str, Any], depth: int = 0) -> Any:
    if depth > 32:
        raise ValueError("cosyvoice yaml: reference cycle")
    if isinstance(node, _Ref):
        expr = node.expr.strip()
        m = re.fullmatch(r"<([A-Za-z0-9_]+)>", expr)
        if m:
            return _resolve(root.get(m.group(1)), root, depth + 1)
        refs = re.findall(r"<([A-Za-z0-9_]+)>", expr)
        if not refs:
            return expr
        vals = {k: _resolve(root.get(k), root, depth + 1) for k in refs}
        if not all(isinstance(v, (int, float)) for v in vals.values()):
            raise ValueError(f"cosyvoice yaml: cannot resolve {expr!r}")
        return _eval_arith(
            re.sub(r"<([A-Za-z0-9_]+)>", lambda mm: repr(vals[mm.group(1)]), expr)
        )
    if isinstance(node, dict):
        return {k: _resolve(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, depth) for v in node]
    return node


def load_cosyvoice_yaml(path: str) -> dict[str, Any]:
    """Read ``cosyvoice2.yaml`` safely: the ``flow`` and ``hift`` sections
    and ``sample_rate`` as plain dicts (references resolved)."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.load(f, Loader=_TagIgnoringLoader)  # noqa: S506
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a mapping")
    out: dict[str, Any] = {}
    for key in ("sample_rate", "flow", "hift"):
        if key in raw:
            out[key] = _resolve(raw[key], raw)
    return out


# --------------------------------------------------------------- model ----
@dataclass
class HiftCache:
    """Overlap state carried between streaming chunks."""

    mel: torch.Tensor  # [1, 80, mel_cache_len]
    source: torch.Tensor  # [1, 1, source_cache_len]
    speech: torch.Tensor  # [1, source_cache_len]


@dataclass
class Token2WavJob:
    """One ``token2wav`` call of a batch (:meth:`token2wav_batch`).

    ``token`` [1, N]: every token of the utterance so far. Streaming chunks
    (``finalize=False``) use the flow's chunk masks, the last chunk and
    offline calls (``finalize=True``) do not, as in the original sessions.
    """

    token: torch.Tensor
    prompt_token: torch.Tensor
    prompt_feat: torch.Tensor
    embedding: torch.Tensor
    token_offset: int = 0
    cache: Any = None
    finalize: bool = True
    generator: torch.Generator | None = None

    def run_alone(self, model: nn.Module) -> tuple[torch.Tensor, Any]:
        """This chunk through ``model.token2wav`` (the unbatched path)."""
        return model.token2wav(
            self.token,
            self.prompt_token,
            self.prompt_feat,
            self.embedding,
            token_offset=self.token_offset,
            cache=self.cache,
            stream=not self.finalize,
            finalize=self.finalize,
            generator=self.generator,
        )


def _batched_flow(flow: nn.Module, jobs: list[Token2WavJob]) -> list[torch.Tensor]:
    """The new mel [1, 80, T] of every job (past its ``token_offset``):
    one padded flow pass per kind (streaming chunks, final chunks)."""
    mels: list[torch.Tensor | None] = [None] * len(jobs)
    for finalize in (False, True):
        idx = [i for i, j in enumerate(jobs) if j.finalize == finalize]
        if not idx:
            continue
        out = flow.forward_batch(
            [jobs[i].token for i in idx],
            [jobs[i].prompt_token for i in idx],
            [jobs[i].prompt_feat for i in idx],
            torch.cat([jobs[i].embedding.reshape(1, -1) for i in idx]),
            streaming=not finalize,
            finalize=finalize,
        )
        for i, mel in zip(idx, out):
            mels[i] = mel[None, :, jobs[i].token_offset * flow.token_mel_ratio :]
    return mels  # type: ignore[return-value]


def _groups(keys: list[Any]) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


class CosyVoice2Token2Wav(nn.Module):
    """Speech tokens (25 Hz) -> waveform (24 kHz) with CosyVoice2's flow and
    HiFT, offline (:meth:`synthesize`) or streaming (:meth:`stream`)."""

    def __init__(
        self,
        flow: CausalMaskedDiffWithXvec,
        hift: HiFTGenerator,
        sample_rate: int | None = None,
        token_hop_len: int = 25,
        mel_cache_len: int = 8,
    ):
        super().__init__()
        self.flow = flow
        self.hift = hift
        self.sample_rate = int(sample_rate or hift.sampling_rate)
        self.token_rate = flow.token_rate  # 25 Hz
        self.mel_rate = flow.mel_rate  # 50 Hz
        self.token_mel_ratio = flow.token_mel_ratio
        self.samples_per_mel = hift.upsample_factor  # 480
        self.samples_per_token = self.samples_per_mel * self.token_mel_ratio
        self.pre_lookahead_len = flow.pre_lookahead_len
        # Must match the flow's training static chunk (CosyVoice2Model).
        self.token_hop_len = token_hop_len
        self.mel_cache_len = mel_cache_len
        self.source_cache_len = mel_cache_len * self.samples_per_mel
        window = torch.hamming_window(
            2 * self.source_cache_len, periodic=False, dtype=torch.float64
        )
        self.register_buffer("speech_window", window, persistent=False)

    @classmethod
    def from_pretrained(
        cls, model_dir: str, device: str | torch.device = "cpu", **kwargs: Any
    ) -> "CosyVoice2Token2Wav":
        """Load ``flow.pt`` + ``hift.pt`` (+ dims from ``cosyvoice2.yaml``;
        release defaults when the yaml is absent)."""
        if os.path.exists(os.path.join(model_dir, "cosyvoice3.yaml")):
            raise ValueError(
                f"{model_dir}: a CosyVoice3 release (DiT flow, causal HiFT); "
                "load it with CosyVoice3Token2Wav"
            )
        ypath = os.path.join(model_dir, "cosyvoice2.yaml")
        conf: dict[str, Any] = {}
        if os.path.exists(ypath):
            conf = load_cosyvoice_yaml(ypath)
        else:
            logger.warning("%s not found; using CosyVoice2-0.5B dims", ypath)
        return cls.from_settings(model_dir, conf, device, **kwargs)

    @classmethod
    def from_settings(
        cls,
        model_dir: str,
        conf: Mapping[str, Any],
        device: str | torch.device = "cpu",
        n_timesteps: int | None = None,
        **kwargs: Any,
    ) -> "CosyVoice2Token2Wav":
        """Load ``model_dir``'s ``flow.pt`` + ``hift.pt`` with the dims of
        ``conf``'s ``flow`` / ``hift`` sections (``cosyvoice2.yaml``'s
        layout; the CosyVoice2-0.5B dims where one is absent) and its
        ``sample_rate``; ``n_timesteps`` overrides the flow's Euler steps."""
        flow_cfg = (
            CosyVoiceFlowConfig.from_dict(conf["flow"])
            if isinstance(conf.get("flow"), Mapping)
            else CosyVoiceFlowConfig()
        )
        if n_timesteps is not None:
            flow_cfg = dataclasses.replace(flow_cfg, n_timesteps=n_timesteps)
        hift_cfg = (
            HiFTConfig.from_dict(conf["hift"])
            if isinstance(conf.get("hift"), Mapping)
            else HiFTConfig()
        )
        flow = load_flow(_load_state(model_dir, "flow.pt"), flow_cfg)
        hift = load_hift(_load_state(model_dir, "hift.pt"), hift_cfg)
        model = cls(flow, hift, sample_rate=conf.get("sample_rate"), **kwargs)
        return model.to(device).eval()

    # ------------------------------------------------------------------
    def _fade(self, speech: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        n = self.speech_window.shape[0] // 2
        w = self.speech_window
        out = speech.clone()
        out[..., :n] = (
            speech[..., :n].double() * w[:n] + prev[..., -n:].double() * w[n:]
        ).to(speech.dtype)
        return out

    @torch.inference_mode()
    def token2wav(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        token_offset: int = 0,
        cache: HiftCache | None = None,
        stream: bool = False,
        finalize: bool = True,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, HiftCache | None]:
        """One call of the original ``CosyVoice2Model.token2wav``.

        ``token`` [1, N] holds every generated token so far; audio is made for
        tokens from ``token_offset`` on. Returns (speech [1, n], new cache);
        with ``finalize=False`` the last ``source_cache_len`` samples are held
        back in the cache for the cross-fade.
        """
        mel = self.flow(
            token,
            prompt_token,
            prompt_feat,
            embedding,
            streaming=stream,
            finalize=finalize,
        )
        mel = self._with_cache(mel[:, :, token_offset * self.token_mel_ratio :], cache)
        if finalize and speed != 1.0:
            if cache is not None:
                raise ValueError("speed change is only supported offline")
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        cache_source = cache.source if cache is not None else None
        speech, source = self.hift(mel, cache_source, generator=generator)
        return self._finish_chunk(mel, speech, source, cache, finalize)

    @staticmethod
    def _with_cache(mel: torch.Tensor, cache: HiftCache | None) -> torch.Tensor:
        """The chunk's mel after the previous chunk's cached frames."""
        if cache is None:
            return mel
        return torch.cat([cache.mel.to(mel), mel], dim=2)

    def _finish_chunk(
        self,
        mel: torch.Tensor,
        speech: torch.Tensor,
        source: torch.Tensor,
        cache: HiftCache | None,
        finalize: bool,
    ) -> tuple[torch.Tensor, HiftCache | None]:
        """Cross-fade with the previous chunk; a non-final chunk holds its
        last ``source_cache_len`` samples back in the new cache."""
        if cache is not None:
            speech = self._fade(speech, cache.speech)
        if finalize:
            return speech, None
        new_cache = HiftCache(
            mel[:, :, -self.mel_cache_len :],
            source[:, :, -self.source_cache_len :],
            speech[:, -self.source_cache_len :],
        )
        return speech[:, : -self.source_cache_len], new_cache

    @torch.inference_mode()
    def token2wav_batch(
        self, jobs: list[Token2WavJob]
    ) -> list[tuple[torch.Tensor, HiftCache | None]]:
        """:meth:`token2wav` for several sessions' chunks at once: one
        padded flow pass per kind of chunk, then HiFT over the chunks of
        equal length (every chunk after a session's first), each with the
        random draws of its own generator. Each result equals the job's own
        :meth:`token2wav` call (up to float rounding)."""
        if len(jobs) == 1:
            return [jobs[0].run_alone(self)]
        mels = [
            self._with_cache(m, j.cache)
            for m, j in zip(_batched_flow(self.flow, jobs), jobs)
        ]
        out: list[Any] = [None] * len(jobs)
        keys = [
            (m.shape[2], 0 if j.cache is None else j.cache.source.shape[2])
            for m, j in zip(mels, jobs)
        ]
        for (frames, n_src), idx in _groups(keys).items():
            mel = torch.cat([mels[i] for i in idx])
            draws = [
                self.hift.draw_excitation(
                    frames, jobs[i].generator, mel.device, mel.dtype
                )
                for i in idx
            ]
            cache_source = (
                torch.cat([jobs[i].cache.source.to(mel) for i in idx])
                if n_src
                else None
            )
            speech, source = self.hift(
                mel,
                cache_source,
                phase_init=torch.cat([d[0] for d in draws]),
                noise=torch.cat([d[1] for d in draws]),
            )
            for k, i in enumerate(idx):
                out[i] = self._finish_chunk(
                    mels[i],
                    speech[k : k + 1],
                    source[k : k + 1],
                    jobs[i].cache,
                    jobs[i].finalize,
                )
        return out

    def synthesize(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Offline: all tokens at once -> waveform [1, n]."""
        speech, _ = self.token2wav(
            token,
            prompt_token,
            prompt_feat,
            embedding,
            speed=speed,
            generator=generator,
        )
        return speech

    @torch.inference_mode()
    def synthesize_batch(
        self,
        tokens: list[torch.Tensor],
        prompt_tokens: list[torch.Tensor],
        prompt_feats: list[torch.Tensor],
        embeddings: torch.Tensor,
        generators: list[torch.Generator | None] | None = None,
    ) -> list[torch.Tensor]:
        """Offline for several utterances: one batched flow pass, then the
        vocoder per utterance (HiFT is not causal, so it is not padded).
        Each result equals :meth:`synthesize` on that utterance."""
        mels = self.flow.forward_batch(tokens, prompt_tokens, prompt_feats, embeddings)
        gens = generators or [None] * len(mels)
        return [self.hift(mel[None], generator=g)[0] for mel, g in zip(mels, gens)]

    def stream(
        self,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> "Token2WavStream":
        """A streaming session; feed tokens with ``push``."""
        return Token2WavStream(self, prompt_token, prompt_feat, embedding, generator)


class Token2WavStream:
    """Chunked token2wav session, as ``CosyVoice2Model.tts(stream=True)``.

    ``push(tokens)`` appends generated tokens and returns the audio chunks
    that became ready; ``push([], final=True)`` (or ``finish()``) returns the
    rest. Concatenating every chunk gives the utterance. A chunk is decoded
    once ``hop`` tokens past the offset plus the look-ahead are there; the
    first hop is ``token_hop_len`` plus the padding that aligns the prompt
    to a multiple of it. :func:`push_streams` advances several sessions at
    once, batching their chunks.
    """

    def __init__(
        self,
        model: "CosyVoice2Token2Wav | CosyVoice3Token2Wav",
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        generator: torch.Generator | None = None,
    ):
        self.model = model
        self.prompt_token = prompt_token
        self.prompt_feat = prompt_feat
        self.embedding = embedding
        self.generator = generator
        self.tokens: list[int] = []
        self.token_offset = 0
        self.hop_len = model.token_hop_len
        self.cache: Any = None
        self.finished = False
        hop = model.token_hop_len
        p = prompt_token.shape[1]
        self.prompt_token_pad = math.ceil(p / hop) * hop - p

    def _hop(self) -> int:
        if self.token_offset == 0:
            return self.hop_len + self.prompt_token_pad
        return self.hop_len

    def _grow_hop(self) -> None:
        """After each chunk (CosyVoice2: the hop stays)."""

    def _job(self, n: int, finalize: bool) -> Token2WavJob:
        return Token2WavJob(
            torch.tensor([self.tokens[:n]], dtype=torch.int32),
            self.prompt_token,
            self.prompt_feat,
            self.embedding,
            token_offset=self.token_offset,
            cache=self.cache,
            finalize=finalize,
            generator=self.generator,
        )

    def _ready(self) -> bool:
        """A streaming chunk can be decoded: a hop past the offset plus the
        look-ahead are there."""
        need = self._hop() + self.model.pre_lookahead_len
        return len(self.tokens) - self.token_offset >= need

    def has_work(self, final: bool) -> bool:
        """:meth:`next_job` would give a chunk."""
        return not self.finished and (self._ready() or final)

    def next_job(self, final: bool) -> Token2WavJob | None:
        """The next chunk to decode, or None. Once the LLM has ended
        (``final``) the ready hops go first, then the last chunk of every
        token left, as the original's loop does (its stop test after a hop
        uses the hop that just ran, which comes to the same). Hand the
        job's result to :meth:`commit` before asking again."""
        if self.finished:
            return None
        if self._ready():
            end = self.token_offset + self._hop() + self.model.pre_lookahead_len
            return self._job(end, finalize=False)
        if final:
            return self._job(len(self.tokens), finalize=True)
        return None

    def commit(
        self, job: Token2WavJob, result: tuple[torch.Tensor, Any]
    ) -> torch.Tensor:
        """Take the decoded ``job`` (from :meth:`next_job`); returns its audio."""
        speech, self.cache = result
        if job.finalize:
            self.finished = True
        else:
            self.token_offset += self._hop()
            self._grow_hop()
        return speech

    def push(self, tokens: Any = (), final: bool = False) -> list[torch.Tensor]:
        out = push_streams([self], [tokens], [final])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def finish(self) -> list[torch.Tensor]:
        return self.push((), final=True)


def _alone(model: Any, job: Token2WavJob) -> Any:
    """One chunk by itself: its result, or the exception it raised."""
    try:
        return model.token2wav_batch([job])[0]
    except Exception as e:  # noqa: BLE001
        return e


def push_streams(
    streams: Sequence[Token2WavStream],
    tokens: Sequence[Any],
    finals: Sequence[bool],
    max_rounds: int | None = None,
) -> list[list[torch.Tensor] | BaseException]:
    """``push`` on several sessions of one model, their ready chunks decoded
    in batches (:meth:`token2wav_batch`: round k batches every session's
    k-th ready chunk). Returns each session's chunks, or the exception that
    stopped it: a failing batch is retried one session at a time, so one
    bad session does not fail the others. ``max_rounds`` stops after that
    many rounds; the chunks left stay ready (``has_work``) for the next
    call, which may bring no tokens."""
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("push_streams: a session appears twice")
    out: list[Any] = [[] for _ in streams]
    live: list[int] = []
    for i, (s, t, f) in enumerate(zip(streams, tokens, finals)):
        if s.finished:
            out[i] = RuntimeError("stream already finished")
            continue
        if s.model is not streams[0].model:
            raise ValueError("push_streams: sessions of different models")
        s.tokens.extend(int(x) for x in t)
        live.append(i)

    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        pending = {i: job for i in live if (job := streams[i].next_job(finals[i]))}
        if not pending:
            break
        rounds += 1
        idx = list(pending)
        model = streams[idx[0]].model
        try:
            results: list[Any] = model.token2wav_batch([pending[i] for i in idx])
        except Exception as e:  # noqa: BLE001
            # find the bad session(s): each chunk by itself
            if len(idx) > 1:
                logger.warning(
                    "batched token2wav of %d chunks failed (%r); decoding "
                    "them one by one",
                    len(idx),
                    e,
                )
            many = len(idx) > 1
            results = [_alone(model, pending[i]) for i in idx] if many else [e]
        for i, r in zip(idx, results):
            if isinstance(r, BaseException):
                out[i] = r
                live.remove(i)
            else:
                out[i].append(streams[i].commit(pending[i], r))
    return out


# ------------------------------------------------------------ CosyVoice3 --
def _section_class(path: str, key: str) -> str | None:
    """The ``!new:`` class of a top-level yaml section (read as text)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    m = re.search(rf"^{key}:\s*!new:([\w.]+)", text, flags=re.MULTILINE)
    return m.group(1).rsplit(".", 1)[-1] if m else None


def _load_state(model_dir: str, name: str) -> Mapping[str, torch.Tensor]:
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{model_dir}: {name} not found")
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class MelCache:
    """CosyVoice3 streaming state: the mel so far, samples already out."""

    mel: torch.Tensor  # [1, 80, T]
    speech_offset: int = 0


class CosyVoice3Token2Wav(nn.Module):
    """Speech tokens (25 Hz) -> waveform (24 kHz) with CosyVoice3's DiT flow
    and causal HiFT, offline (:meth:`synthesize`) or streaming
    (:meth:`stream`). Same public interface as :class:`CosyVoice2Token2Wav`;
    the causal HiFT draws no random numbers (its noise is fixed), so the
    ``generator`` arguments are accepted and unused."""

    def __init__(
        self,
        flow: CausalMaskedDiffWithDiT,
        hift: CausalHiFTGenerator,
        sample_rate: int | None = None,
        token_hop_len: int = 25,
        token_max_hop_len: int = 100,
        stream_scale_factor: int = 2,
    ):
        super().__init__()
        if stream_scale_factor < 1:
            raise ValueError("stream_scale_factor must be >= 1")
        self.flow = flow
        self.hift = hift
        self.sample_rate = int(sample_rate or hift.sampling_rate)
        self.token_rate = flow.token_rate  # 25 Hz
        self.mel_rate = flow.mel_rate  # 50 Hz
        self.token_mel_ratio = flow.token_mel_ratio
        self.samples_per_mel = hift.upsample_factor  # 480
        self.samples_per_token = self.samples_per_mel * self.token_mel_ratio
        self.pre_lookahead_len = flow.pre_lookahead_len
        # CosyVoice3Model: the hop must match the flow's training chunk (25
        # tokens = static_chunk_size 50 mel frames) and then grows by
        # stream_scale_factor per chunk up to token_max_hop_len.
        self.token_hop_len = token_hop_len
        self.token_max_hop_len = token_max_hop_len
        self.stream_scale_factor = stream_scale_factor

    @classmethod
    def from_pretrained(
        cls, model_dir: str, device: str | torch.device = "cpu", **kwargs: Any
    ) -> "CosyVoice3Token2Wav":
        """Load ``flow.pt`` + ``hift.pt`` with the dims of
        ``cosyvoice3.yaml`` (release defaults when the yaml is absent)."""
        ypath = os.path.join(model_dir, "cosyvoice3.yaml")
        conf: dict[str, Any] = {}
        if os.path.exists(ypath):
            for key, want in (
                ("flow", "CausalMaskedDiffWithDiT"),
                ("hift", "CausalHiFTGenerator"),
            ):
                got = _section_class(ypath, key)
                if got is not None and got != want:
                    raise ValueError(
                        f"{ypath}: {key} is {got}; CosyVoice3Token2Wav "
                        f"implements {want}"
                    )
            conf = load_cosyvoice_yaml(ypath)
        elif os.path.exists(os.path.join(model_dir, "cosyvoice2.yaml")):
            raise ValueError(
                f"{model_dir}: a CosyVoice2 release; load it with CosyVoice2Token2Wav"
            )
        else:
            logger.warning("%s not found; using Fun-CosyVoice3-0.5B dims", ypath)
        flow_cfg = (
            CosyVoice3FlowConfig.from_dict(conf["flow"])
            if "flow" in conf
            else CosyVoice3FlowConfig()
        )
        hift_cfg = (
            CausalHiFTConfig.from_dict(conf["hift"])
            if "hift" in conf
            else CausalHiFTConfig()
        )
        flow = load_flow3(_load_state(model_dir, "flow.pt"), flow_cfg)
        # The original builds the HiFT right after the flow: its fixed
        # excitation noise continues the flow's RNG stream.
        hift = load_causal_hift(
            _load_state(model_dir, "hift.pt"),
            hift_cfg,
            noise_rng=release_rng_after_flow(flow_cfg),
        )
        model = cls(flow, hift, sample_rate=conf.get("sample_rate"), **kwargs)
        return model.to(device).eval()

    # ------------------------------------------------------------------
    @torch.inference_mode()
    def token2wav(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        token_offset: int = 0,
        cache: MelCache | None = None,
        stream: bool = False,
        finalize: bool = True,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, MelCache]:
        """One call of the original ``CosyVoice3Model.token2wav``.

        ``token`` [1, N] holds every generated token so far; mel is made for
        tokens from ``token_offset`` on and appended to ``cache.mel``; the
        whole mel is vocoded (``finalize=False``: the last 8 frames are held
        back) and only the samples past ``cache.speech_offset`` are
        returned. Returns (speech [1, n], updated cache).
        """
        del generator  # the causal HiFT is deterministic
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if speed != 1.0 and (token_offset != 0 or not finalize or cache is not None):
            raise ValueError("speed change is only supported offline")
        mel = self.flow(
            token,
            prompt_token,
            prompt_feat,
            embedding,
            streaming=stream,
            finalize=finalize,
        )
        mel = mel[:, :, token_offset * self.token_mel_ratio :]
        cache = self._append_mel(mel, cache)
        mel = cache.mel
        if mel.shape[2] == 0:  # no tokens at all
            return mel.new_zeros(1, 0), cache
        if speed != 1.0:
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        speech, _ = self.hift(mel, finalize=finalize)
        return self._new_samples(speech, cache)

    @staticmethod
    def _append_mel(mel: torch.Tensor, cache: MelCache | None) -> MelCache:
        """The session's mel so far (a new cache; the old one is kept)."""
        if cache is None:
            return MelCache(mel)
        return MelCache(torch.cat([cache.mel.to(mel), mel], dim=2), cache.speech_offset)

    @staticmethod
    def _new_samples(
        speech: torch.Tensor, cache: MelCache
    ) -> tuple[torch.Tensor, MelCache]:
        """The samples past those already returned, and the cache after."""
        speech = speech[:, cache.speech_offset :]
        return speech, MelCache(cache.mel, cache.speech_offset + speech.shape[1])

    @torch.inference_mode()
    def token2wav_batch(
        self, jobs: list[Token2WavJob]
    ) -> list[tuple[torch.Tensor, MelCache]]:
        """:meth:`token2wav` for several sessions' chunks at once: one
        padded flow pass per kind of chunk, then the causal HiFT over the
        sessions whose mel so far has the same length. Each result equals
        the job's own :meth:`token2wav` call (up to float rounding)."""
        if len(jobs) == 1:
            return [jobs[0].run_alone(self)]
        caches = [
            self._append_mel(m, j.cache)
            for m, j in zip(_batched_flow(self.flow, jobs), jobs)
        ]
        out: list[Any] = [None] * len(jobs)
        keys = [(c.mel.shape[2], j.finalize) for c, j in zip(caches, jobs)]
        for (frames, finalize), idx in _groups(keys).items():
            if frames == 0:
                for i in idx:
                    out[i] = (caches[i].mel.new_zeros(1, 0), caches[i])
                continue
            speech, _ = self.hift(
                torch.cat([caches[i].mel for i in idx]), finalize=finalize
            )
            for k, i in enumerate(idx):
                out[i] = self._new_samples(speech[k : k + 1], caches[i])
        return out

    def synthesize(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Offline: all tokens at once -> waveform [1, n]."""
        speech, _ = self.token2wav(
            token, prompt_token, prompt_feat, embedding, speed=speed
        )
        return speech

    @torch.inference_mode()
    def synthesize_batch(
        self,
        tokens: list[torch.Tensor],
        prompt_tokens: list[torch.Tensor],
        prompt_feats: list[torch.Tensor],
        embeddings: torch.Tensor,
        generators: list[torch.Generator | None] | None = None,
    ) -> list[torch.Tensor]:
        """Offline for several utterances: one batched flow pass, then the
        vocoder per utterance. Each result equals :meth:`synthesize` on that
        utterance (up to float rounding)."""
        mels = self.flow.forward_batch(tokens, prompt_tokens, prompt_feats, embeddings)
        return [self.hift(mel[None], finalize=True)[0] for mel in mels]

    def stream(
        self,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> "CosyVoice3Token2WavStream":
        """A streaming session; feed tokens with ``push``."""
        return CosyVoice3Token2WavStream(self, prompt_token, prompt_feat, embedding)


class CosyVoice3Token2WavStream(Token2WavStream):
    """Chunked token2wav session, as ``CosyVoice3Model.tts(stream=True)``
    (the loop of ``CosyVoice2Model.tts``): after each chunk the hop grows
    ``x stream_scale_factor`` up to ``token_max_hop_len``. (The original
    keeps that growth on the model object, so only its first session
    starts from 25; here every session does.)
    """

    def _grow_hop(self) -> None:
        self.hop_len = min(
            self.model.token_max_hop_len,
            self.hop_len * self.model.stream_scale_factor,
        )
