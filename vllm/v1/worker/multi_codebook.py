# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Per-request codebook state of multi-codebook models in the V1 runner.

Models implementing ``SupportsMultiCodebook`` (e.g. Fish Speech's dual-AR
transformer) emit, at every step, one main token (sampled from
``compute_logits``) plus ``num_aux_codebooks`` auxiliary codes chosen by the
model itself in ``sample_codebooks``. The auxiliary codes of a position are
fed back with its token id through ``embed_input_ids(ids, aux_codes)``.

This module keeps the codes of every position of every request, indexed by
position, on the request's cached state. Because inputs are gathered by
position, chunked prefill and the re-prefill of a preempted request see the
same codes as the first pass. Prompt positions may carry codes too (e.g.
reference audio for voice cloning): they come from
``SamplingParams.extra_args["prompt_aux_codes"]``, a list of
``[position, code_1, ..., code_{K-1}]`` rows.

Under async scheduling the next step is prepared while the device still
runs the current one, so the codes just sampled are not on the host yet.
They stay on the device as the step's ``_PendingCodes``: the next step
gathers them into its input (where vLLM gathers the last sampled token ids)
and into the last row of the sampling history, and they are written to the
host frames, with the main token ids replacing vLLM's ``-1`` placeholders in
``output_token_ids``, once the step after has been launched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.v1.outputs import SamplerOutput

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

logger = init_logger(__name__)

PROMPT_AUX_CODES_KEY = "prompt_aux_codes"


def parse_prompt_aux_codes(
    extra_args: dict[str, Any] | None, num_prompt_tokens: int, num_aux: int
) -> np.ndarray | None:
    """Validate ``extra_args["prompt_aux_codes"]`` and return it as an int64
    array ``[n, 1 + num_aux]`` (position first), or None if absent."""
    rows = (extra_args or {}).get(PROMPT_AUX_CODES_KEY)
    if rows is None or len(rows) == 0:
        return None
    arr = np.asarray(rows)
    if arr.ndim != 2 or arr.shape[1] != 1 + num_aux or arr.dtype.kind not in "iu":
        raise ValueError(
            f"{PROMPT_AUX_CODES_KEY} must be integer rows of [position, "
            f"{num_aux} codes]; got an array of shape {arr.shape} "
            f"and dtype {arr.dtype}"
        )
    pos = arr[:, 0]
    if pos.min() < 0 or pos.max() >= num_prompt_tokens:
        raise ValueError(
            f"{PROMPT_AUX_CODES_KEY} positions must lie in the prompt "
            f"[0, {num_prompt_tokens})"
        )
    if num_aux and arr[:, 1:].min() < 0:
        raise ValueError(f"{PROMPT_AUX_CODES_KEY} codes must be >= 0")
    return arr.astype(np.int64)


def validate_multi_codebook_request(
    model_config: Any, params: Any, prompt_token_ids: list[int] | None
) -> None:
    """Front-end check of ``prompt_aux_codes`` (a bad request must fail with
    a clear error before it reaches the engine)."""
    extra_args = getattr(params, "extra_args", None)
    if not extra_args or PROMPT_AUX_CODES_KEY not in extra_args:
        return
    from vllm.model_executor.model_loader import get_model_cls

    model_cls = get_model_cls(model_config)
    sizes = list(model_cls.get_aux_codebook_sizes(model_config))
    codes = parse_prompt_aux_codes(extra_args, len(prompt_token_ids or []), len(sizes))
    if codes is not None and sizes:
        too_big = codes[:, 1:] >= np.asarray(sizes, np.int64)
        if too_big.any():
            book = int(np.nonzero(too_big.any(axis=0))[0][0]) + 1
            raise ValueError(
                f"{PROMPT_AUX_CODES_KEY}: codebook {book} codes must be "
                f"< {sizes[book - 1]}"
            )


class _NoEvent:
    """Stand-in for a CUDA event where copies are synchronous (CPU)."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _PendingCodes:
    """One step's sampled tokens and codes, still on the device."""

    __slots__ = ("main", "aux", "main_cpu", "aux_cpu", "event", "rows")

    def __init__(
        self,
        main: torch.Tensor,
        aux: torch.Tensor,
        rows: dict[str, tuple[int, int]],
        event: Any,
    ) -> None:
        self.main = main  # [R] int64
        self.aux = aux  # [R, num_aux] int64
        # req_id -> (row in the step's batch, position of the new token)
        self.rows = rows
        self.main_cpu = main.to("cpu", non_blocking=True)
        self.aux_cpu = aux.to("cpu", non_blocking=True)
        self.event = event
        event.record()

    def hit(self, req_id: str, lo: int, hi: int) -> tuple[int, int] | None:
        """(row, position) of ``req_id`` if its new token lies in [lo, hi)."""
        row_pos = self.rows.get(req_id)
        if row_pos is not None and lo <= row_pos[1] < hi:
            return row_pos
        return None


class MultiCodebookRunnerState:
    """The V1 runner's hooks for ``SupportsMultiCodebook`` models."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self._model: Any = None
        # Frames of every request: [capacity, num_aux] aux codes by position.
        self.frames: dict[str, np.ndarray] = {}
        self._pending_aux: torch.Tensor | None = None
        self._saved_generators: dict[int, torch.Tensor] = {}
        # Async scheduling: the last step's codes, still on the device.
        self._pending: _PendingCodes | None = None
        # Codes sampled by the current step ([R, num_aux], device).
        self._step_aux: torch.Tensor | None = None
        # Position of each scheduled request's next token (this step).
        self._next_pos: dict[str, int] = {}
        # Pinned staging buffers for host -> device copies (async only).
        self._staging: dict[str, tuple[torch.Tensor, Any]] = {}

    @property
    def model(self) -> Any:
        if self._model is None:
            model = self.runner.get_model()
            if not getattr(model, "supports_multi_codebook", False):
                raise TypeError(
                    f"{type(model).__name__} is registered as a multi-codebook "
                    "model but does not implement SupportsMultiCodebook"
                )
            self._model = model
        return self._model

    @property
    def num_aux(self) -> int:
        return int(self.model.num_aux_codebooks)

    @property
    def window(self) -> int:
        return int(getattr(self.model, "codebook_history_window", 0))

    @property
    def async_scheduling(self) -> bool:
        return bool(getattr(self.runner, "use_async_scheduling", False))

    def _event(self) -> Any:
        if torch.device(self.runner.device).type == "cuda":
            return torch.cuda.Event()
        return _NoEvent()

    def _upload(self, name: str, arr: np.ndarray) -> torch.Tensor:
        """Host -> device copy of a small int64 array.

        With async scheduling a copy from pageable memory could wait for the
        device, so it goes through a pinned staging buffer, reused once its
        previous copy has completed (long done: it fed the step before)."""
        device = self.runner.device
        if not self.async_scheduling or torch.device(device).type != "cuda":
            return torch.from_numpy(arr).to(device, non_blocking=True)
        buf, event = self._staging.get(name, (None, None))
        if event is not None:
            event.synchronize()
        n = arr.size
        if buf is None or buf.numel() < n:
            size = max(n, 1024, 2 * (buf.numel() if buf is not None else 0))
            buf = torch.empty(size, dtype=torch.int64, pin_memory=True)
        host = buf[:n]
        host.numpy()[:] = arr.reshape(-1)
        out = host.view(arr.shape).to(device, non_blocking=True)
        event = self._event()
        event.record()
        self._staging[name] = (buf, event)
        return out

    def _store(
        self, req_id: str, frames: np.ndarray, pos: int, codes: np.ndarray
    ) -> None:
        if pos >= frames.shape[0]:
            grown = np.zeros((pos + 64, self.num_aux), np.int64)
            grown[: frames.shape[0]] = frames
            self.frames[req_id] = frames = grown
        frames[pos] = codes

    def flush(self) -> None:
        """Write the pending step's codes to the host frames and its token
        ids over the ``-1`` placeholders of ``output_token_ids``."""
        pend, self._pending = self._pending, None
        if pend is None:
            return
        pend.event.synchronize()
        main = pend.main_cpu.tolist()
        aux = pend.aux_cpu.numpy()
        requests = self.runner.requests
        for req_id, (row, pos) in pend.rows.items():
            frames = self.frames.get(req_id)
            req_state = requests.get(req_id)
            if frames is None or req_state is None:
                continue  # finished meanwhile
            self._store(req_id, frames, pos, aux[row])
            out = req_state.output_token_ids
            k = pos - req_state.num_prompt_tokens
            if 0 <= k < len(out) and out[k] == -1:
                out[k] = main[row]

    # ---- request life cycle -------------------------------------------------

    def _frames_of(self, req_state: CachedRequestState) -> np.ndarray:
        frames = self.frames.get(req_state.req_id)
        if frames is None:
            num_prompt = req_state.num_prompt_tokens
            params = req_state.sampling_params
            max_tokens = params.max_tokens if params is not None else None
            cap = self.runner.max_model_len
            if max_tokens is not None:
                cap = min(cap, num_prompt + max_tokens + 1)
            frames = np.zeros((max(cap, num_prompt + 1), self.num_aux), np.int64)
            prompt_codes = parse_prompt_aux_codes(
                params.extra_args if params is not None else None,
                num_prompt,
                self.num_aux,
            )
            if prompt_codes is not None:
                frames[prompt_codes[:, 0]] = prompt_codes[:, 1:]
            self.frames[req_state.req_id] = frames
        return frames

    def remove_requests(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            self.frames.pop(req_id, None)

    # ---- inputs ---------------------------------------------------------------

    def embed_inputs(
        self, scheduler_output: SchedulerOutput, num_scheduled_tokens: int
    ) -> torch.Tensor:
        """Input embeddings of the scheduled tokens, codes included."""
        runner = self.runner
        batch: InputBatch = runner.input_batch
        spans = [
            (
                req_id,
                int(batch.num_computed_tokens_cpu[i]),
                scheduler_output.num_scheduled_tokens[req_id],
            )
            for i, req_id in enumerate(batch.req_ids)
        ]
        pend = self._pending
        if pend is not None and any(
            pend.hit(req_id, start, start + n - 1) for req_id, start, n in spans
        ):
            # A pending code is needed before the last scheduled position
            # (e.g. a request resumed after preemption): wait for it.
            self.flush()
            pend = None
        chunks = []
        gather: list[tuple[int, int]] = []  # (input row, pending row)
        self._next_pos = {}
        offset = 0
        for req_id, start, n in spans:
            frames = self._frames_of(runner.requests[req_id])
            chunk = frames[start : start + n]
            if chunk.shape[0] < n:  # only past max_tokens; codes are zeros
                chunk = np.concatenate(
                    [chunk, np.zeros((n - chunk.shape[0], self.num_aux), np.int64)]
                )
            chunks.append(chunk)
            if pend is not None and n > 0:
                row_pos = pend.hit(req_id, start + n - 1, start + n)
                if row_pos is not None:
                    gather.append((offset + n - 1, row_pos[0]))
            self._next_pos[req_id] = start + n
            offset += n
        aux = np.concatenate(chunks) if chunks else np.zeros((0, self.num_aux))
        assert aux.shape[0] == num_scheduled_tokens
        aux_t = self._upload("aux", aux.astype(np.int64, copy=False))
        if gather:
            assert pend is not None
            idx = self._upload("aux_idx", np.asarray(gather, np.int64).T.copy())
            aux_t[idx[0]] = pend.aux[idx[1]]
        return self.model.embed_input_ids(
            runner.input_ids.gpu[:num_scheduled_tokens], aux_codes=aux_t
        )

    # ---- sampling ---------------------------------------------------------------

    def _history(self) -> torch.Tensor:
        """[R, W, 1 + num_aux]: each request's last W generated frames, oldest
        first, padded with -1 at the end. A model with
        ``codebook_history_includes_prompt`` gets the last W positions of
        prompt + output instead (e.g. SoulX-Podcast's RAS window)."""
        runner = self.runner
        batch: InputBatch = runner.input_batch
        w, k = self.window, 1 + self.num_aux
        with_prompt = bool(
            getattr(self.model, "codebook_history_includes_prompt", False)
        )
        hist = np.full((batch.num_reqs, w, k), -1, np.int64)
        if not w:
            return self._upload("hist", hist)
        pend = self._pending
        if pend is not None and any(
            pend.hit(req_id, 0, self._end_of(runner.requests[req_id]) - 1)
            for req_id in batch.req_ids
        ):
            self.flush()  # an older pending frame is inside the window
            pend = None
        gather: list[tuple[int, int, int]] = []  # (row, column, pending row)
        for i, req_id in enumerate(batch.req_ids):
            req_state = runner.requests[req_id]
            out = req_state.output_token_ids[-w:]
            prompt = req_state.prompt_token_ids
            if with_prompt and len(out) < w and prompt:
                start = max(0, len(prompt) - (w - len(out)))
                out = list(prompt[start:]) + list(out)
            n = len(out)
            if n == 0:
                continue
            end = self._end_of(req_state)
            hist[i, :n, 0] = out
            hist[i, :n, 1:] = self._frames_of(req_state)[end - n : end]
            if pend is not None:
                row_pos = pend.hit(req_id, end - 1, end)
                if row_pos is not None:  # the last frame is still on device
                    gather.append((i, n - 1, row_pos[0]))
        hist_t = self._upload("hist", hist)
        if gather:
            assert pend is not None
            idx = self._upload("hist_idx", np.asarray(gather, np.int64).T.copy())
            hist_t[idx[0], idx[1], 0] = pend.main[idx[2]]
            hist_t[idx[0], idx[1], 1:] = pend.aux[idx[2]]
        return hist_t

    @staticmethod
    def _end_of(req_state: CachedRequestState) -> int:
        return req_state.num_prompt_tokens + len(req_state.output_token_ids)

    def sample(
        self, logits: torch.Tensor, hidden_states: torch.Tensor
    ) -> SamplerOutput:
        """Sample main tokens and aux codes with the model's own sampler."""
        runner = self.runner
        sampling_metadata = runner.input_batch.sampling_metadata
        runner.input_batch.update_async_output_token_ids()
        # Rows whose sample is discarded (partial prefill) must not advance
        # their seeded generator: save the state, restored in record().
        num_reqs = runner.input_batch.num_reqs
        discard = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
        self._saved_generators = {
            int(i): sampling_metadata.generators[int(i)].get_state()
            for i in discard
            if int(i) in sampling_metadata.generators
        }
        main_ids, aux = self.model.sample_codebooks(
            logits, hidden_states, sampling_metadata, self._history()
        )
        if aux.shape != (main_ids.shape[0], self.num_aux):
            raise RuntimeError(
                f"sample_codebooks returned codes of shape {tuple(aux.shape)}, "
                f"expected ({main_ids.shape[0]}, {self.num_aux})"
            )
        self._step_aux = aux
        if self.async_scheduling:
            # The previous step's codes are complete on the device by the
            # time this step's are sampled: move them to the host now.
            self.flush()
            discard_mask = runner.discard_request_mask.np[:num_reqs]
            rows = {
                req_id: (i, self._next_pos[req_id])
                for i, req_id in enumerate(runner.input_batch.req_ids)
                if not discard_mask[i] and req_id in self._next_pos
            }
            self._pending = _PendingCodes(
                main_ids.long(), aux.long(), rows, self._event()
            )
        else:
            self._pending_aux = aux
        logprobs_tensors = None
        max_num_logprobs = sampling_metadata.max_num_logprobs
        if max_num_logprobs is not None:
            sampler = runner.sampler
            raw = sampler.compute_logprobs(logits)
            num = raw.shape[-1] if max_num_logprobs == -1 else max_num_logprobs
            logprobs_tensors = sampler.gather_logprobs(raw, num, main_ids.long())
        return SamplerOutput(
            sampled_token_ids=main_ids.to(torch.int32).unsqueeze(-1),
            logprobs_tensors=logprobs_tensors,
        )

    def step_codes(self) -> torch.Tensor | None:
        """The codes sampled by this step ([num_reqs, num_aux], batch order,
        on the device) for the async engine output."""
        aux, self._step_aux = self._step_aux, None
        return aux

    def record(self, valid_sampled_token_ids: list[list[int]]) -> np.ndarray | None:
        """After bookkeeping: store the step's codes at the new positions and
        return them ([num_reqs, num_aux], batch order) for the engine output.
        With async scheduling the codes are stored one step later (flush) and
        returned through ``step_codes``; this returns None."""
        runner = self.runner
        generators = runner.input_batch.sampling_metadata.generators
        for i, state in self._saved_generators.items():
            generators[i].set_state(state)
        self._saved_generators = {}
        aux = self._pending_aux
        self._pending_aux = None
        if aux is None:
            return None
        aux_np = aux.to("cpu", torch.int64).numpy()
        self._step_aux = None
        for i, req_id in enumerate(runner.input_batch.req_ids):
            if i >= len(valid_sampled_token_ids) or not valid_sampled_token_ids[i]:
                continue
            req_state = runner.requests[req_id]
            frames = self._frames_of(req_state)
            pos = req_state.num_prompt_tokens + len(req_state.output_token_ids) - 1
            self._store(req_id, frames, pos, aux_np[i])
        return aux_np

    def dummy_sample(self, logits: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Profile run: exercise the model's sampler (fast transformer) at the
        largest batch so its memory is counted."""
        from vllm.v1.sample.logits_processor import LogitsProcessors
        from vllm.v1.sample.metadata import SamplingMetadata

        n = logits.shape[0]
        full = lambda v: torch.full((n,), v, device=logits.device)  # noqa: E731
        metadata = SamplingMetadata(
            temperature=full(0.7),
            all_greedy=False,
            all_random=True,
            top_p=full(0.8),
            top_k=None,
            generators={},
            max_num_logprobs=None,
            no_penalties=False,
            prompt_token_ids=None,
            frequency_penalties=full(0.0),
            presence_penalties=full(0.0),
            repetition_penalties=full(1.1),
            output_token_ids=[[] for _ in range(n)],
            allowed_token_ids_mask=None,
            bad_words_token_ids={},
            logitsprocs=LogitsProcessors(),
        )
        hist = torch.full(
            (n, self.window, 1 + self.num_aux),
            -1,
            dtype=torch.int64,
            device=logits.device,
        )
        self.model.sample_codebooks(logits, hidden_states, metadata, hist)
