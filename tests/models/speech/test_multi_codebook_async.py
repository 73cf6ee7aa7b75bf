# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The multi-codebook runner state under async scheduling, on CPU.

The CPU platform never schedules asynchronously, so the engine tests cannot
reach this path here (tests/models/speech/test_multi_codebook_gpu.py does, on
a GPU). This test drives ``MultiCodebookRunnerState`` with a stand-in runner
the way ``GPUModelRunner`` does in each mode: under async scheduling the
bookkeeping appends ``-1`` placeholders and the step's codes stay "on the
device" until the next step. Every step's fed-back codes, sampling history,
the stored frames and the repaired token ids must equal the synchronous run,
through chunked prefill, a request leaving and re-joining the batch, and a
request resumed from preemption.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm.v1.worker.multi_codebook import MultiCodebookRunnerState

NUM_AUX, BOOK, WINDOW = 2, 7, 3


class _Model:
    """Codes and tokens derived from the fed-back input and the history, so a
    wrong feed-back or window changes every later step. ``num_aux=0`` with
    ``with_prompt`` is the CosyVoice / SoulX-Podcast use (RAS window only)."""

    supports_multi_codebook = True
    codebook_history_window = WINDOW

    def __init__(self, num_aux=NUM_AUX, with_prompt=False):
        self.num_aux_codebooks = num_aux
        self.codebook_history_includes_prompt = with_prompt
        self.log: list[tuple[str, list]] = []

    def embed_input_ids(self, input_ids, aux_codes=None):
        self.log.append(("embed", aux_codes.tolist()))
        # "hidden state" of a token: its id and its codes
        return torch.cat([input_ids[:, None].long(), aux_codes.long()], dim=1)

    def sample_codebooks(self, logits, hidden_states, sampling_metadata, history):
        self.log.append(("history", history.tolist()))
        valid = history[..., 0] >= 0
        hist_sum = torch.where(valid[..., None], history, 0).sum(dim=(1, 2))
        last = hidden_states.sum(dim=1)
        main = 20 + (3 * last + hist_sum) % 50
        ks = torch.arange(self.num_aux_codebooks)
        aux = (main[:, None] * (ks + 2) + hist_sum[:, None] + ks) % BOOK
        return main, aux


class _Runner:
    """The attributes of GPUModelRunner the state uses, driven by run()."""

    def __init__(self, use_async: bool, **model_kw):
        self.use_async_scheduling = use_async
        self.device = torch.device("cpu")
        self.max_model_len = 64
        self.model = _Model(**model_kw)
        self.requests: dict[str, SimpleNamespace] = {}
        self.input_batch = SimpleNamespace(
            req_ids=[],
            num_reqs=0,
            num_computed_tokens_cpu=np.zeros(8, np.int64),
            sampling_metadata=SimpleNamespace(generators={}, max_num_logprobs=None),
            update_async_output_token_ids=lambda: None,
        )
        self.discard_request_mask = SimpleNamespace(np=np.zeros(8, bool))
        self.input_ids = SimpleNamespace(gpu=None)

    def get_model(self):
        return self.model


def _request(req_id, prompt, codes=None):
    extra = {"prompt_aux_codes": codes} if codes else None
    return SimpleNamespace(
        req_id=req_id,
        prompt_token_ids=list(prompt),
        num_prompt_tokens=len(prompt),
        output_token_ids=[],
        num_computed_tokens=0,
        sampling_params=SimpleNamespace(max_tokens=20, extra_args=extra),
    )


# Each step: {req_id: num_scheduled_tokens}; "resume:<id>" re-prefills a
# preempted request from position 0 (prompt + its output tokens).
PROMPTS = {
    "a": ([5, 6, 7], [[1, 3, 4]]),
    "b": ([9, 8, 7, 6, 5, 4, 3, 2], None),  # prefilled in two chunks
    "c": ([11, 12], [[0, 6, 6], [1, 2, 5]]),
}
SCHEDULE = [
    {"a": 3, "b": 4},
    {"a": 1, "b": 4},
    {"a": 1, "b": 1, "c": 2},
    {"b": 1, "c": 1},  # a is not scheduled this step
    {"a": 1, "b": 1, "c": 1},
    {"a": 1, "resume:b": None, "c": 1},  # b preempted and resumed at once
    {"a": 1, "b": 1},
    {"a": 1, "b": 1, "c": 1},
]


def run(use_async: bool, num_aux=NUM_AUX, with_prompt=False):
    runner = _Runner(use_async, num_aux=num_aux, with_prompt=with_prompt)
    state = MultiCodebookRunnerState(runner)
    truth: dict[str, list[int]] = {}  # real output ids (what the GPU holds)
    for req_id, (prompt, codes) in PROMPTS.items():
        if codes and num_aux == 0:
            codes = None
        runner.requests[req_id] = _request(req_id, prompt, codes)
        truth[req_id] = []
    for sched in SCHEDULE:
        batch = runner.input_batch
        num_sched: dict[str, int] = {}
        for key, n in sched.items():
            req_id = key.removeprefix("resume:")
            rs = runner.requests[req_id]
            if key.startswith("resume:"):
                # vLLM restores the output ids of a resumed request.
                rs.output_token_ids = list(truth[req_id])
                rs.num_computed_tokens = 0
                n = rs.num_prompt_tokens + len(truth[req_id])
            num_sched[req_id] = n
        batch.req_ids = list(num_sched)
        batch.num_reqs = len(num_sched)
        ids, last_rows = [], []
        for i, req_id in enumerate(batch.req_ids):
            rs = runner.requests[req_id]
            start, n = rs.num_computed_tokens, num_sched[req_id]
            batch.num_computed_tokens_cpu[i] = start
            seq = rs.prompt_token_ids + truth[req_id]
            ids += seq[start : start + n]
            last_rows.append(len(ids) - 1)
            runner.discard_request_mask.np[i] = start + n < rs.num_prompt_tokens
        runner.input_ids.gpu = torch.tensor(ids, dtype=torch.int32)
        so = SimpleNamespace(num_scheduled_tokens=num_sched)
        hidden = state.embed_inputs(so, len(ids))[last_rows]
        out = state.sample(hidden.float(), hidden)
        main = out.sampled_token_ids[:, 0].tolist()
        step_aux = None
        valid = []
        for i, req_id in enumerate(batch.req_ids):
            rs = runner.requests[req_id]
            rs.num_computed_tokens += num_sched[req_id]
            if runner.discard_request_mask.np[i]:
                valid.append([])
                continue
            valid.append([main[i]])
            truth[req_id].append(main[i])
            rs.output_token_ids.append(-1 if use_async else main[i])
        recorded = state.record([] if use_async else valid)
        if use_async:
            assert recorded is None
            step_aux = state.step_codes().tolist()
        else:
            step_aux = recorded.tolist()
        runner.model.log.append(("codes", step_aux))
    state.flush()
    outs = {r: list(rs.output_token_ids) for r, rs in runner.requests.items()}
    frames = {
        r: f[: runner.requests[r].num_prompt_tokens + len(truth[r])].tolist()
        for r, f in state.frames.items()
    }
    return runner.model.log, outs, frames, truth


@pytest.mark.parametrize(
    "num_aux, with_prompt", [(NUM_AUX, False), (0, True)], ids=["fish", "ras-window"]
)
def test_async_matches_sync(num_aux, with_prompt):
    sync_log, sync_out, sync_frames, truth = run(False, num_aux, with_prompt)
    async_log, async_out, async_frames, _ = run(True, num_aux, with_prompt)
    assert len(sync_log) == len(async_log)
    for s, a in zip(sync_log, async_log):
        assert s == a
    # flush() wrote the last codes and replaced every placeholder
    assert async_out == sync_out == truth
    assert async_frames == sync_frames
    # the run is not trivial: codes vary and the history windows fill up
    tokens = {t for ids in truth.values() for t in ids}
    assert len(tokens) > 3
    if num_aux:
        codes = [c for kind, v in sync_log if kind == "codes" for c in v]
        assert len({tuple(c) for c in codes}) > 3
    hist = [v for kind, v in sync_log if kind == "history"]
    assert any(all(f[0] >= 0 for f in row) for h in hist for row in h)


def test_pending_codes_reach_next_input():
    """Without the device-side gather the next step would feed zeros: check
    the async run really fed the codes sampled one step earlier."""
    log, _, _, _ = run(use_async=True)
    embeds = [v for kind, v in log if kind == "embed"]
    codes = [v for kind, v in log if kind == "codes"]
    # step 2 (index 2) schedules a, b, c; a's input is step 1's code of a
    assert embeds[2][0] == codes[1][0]
    assert any(c != [0, 0] for c in codes[1])


@pytest.mark.parametrize("use_async", [False, True])
def test_finished_request_is_forgotten(use_async):
    runner = _Runner(use_async)
    state = MultiCodebookRunnerState(runner)
    runner.requests["a"] = _request("a", [5, 6, 7])
    batch = runner.input_batch
    batch.req_ids, batch.num_reqs = ["a"], 1
    batch.num_computed_tokens_cpu[0] = 0
    runner.input_ids.gpu = torch.tensor([5, 6, 7], dtype=torch.int32)
    so = SimpleNamespace(num_scheduled_tokens={"a": 3})
    hidden = state.embed_inputs(so, 3)[[2]]
    state.sample(hidden.float(), hidden)
    runner.requests["a"].output_token_ids.append(-1 if use_async else 1)
    state.record([] if use_async else [[1]])
    state.remove_requests({"a"})
    del runner.requests["a"]
    state.flush()  # a pending step of a finished request is dropped
    assert state.frames == {}
