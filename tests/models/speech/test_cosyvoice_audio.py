# SPDX-License-Identifier: Apache-2.0
"""Parity of the CosyVoice2 audio stack (flow decoder + HiFT vocoder) with the
original implementation.

Oracle: PyPI ``cosyvoice-minicpmo==0.1.0`` (a copy of the original ``cosyvoice``
package at the CosyVoice2 stage). The reference modules are built with shrunk
dims and random weights, their state dicts saved exactly as the release files
(``flow.pt`` / ``hift.pt``), loaded by our code and compared in fp32.
"""

import logging
import sys
import types

import pytest
import torch


def _install_matcha_logger_shim() -> None:
    # ``matcha.models.components.flow_matching`` imports ``matcha.utils``,
    # whose __init__ pulls lightning/hydra/rich just for a logger factory. The
    # modules the oracle needs use nothing else from it, so provide only the
    # logger factory (no model code is replaced).
    if "matcha.utils.pylogger" in sys.modules:
        return
    import matcha  # noqa: F401  (the real package from cosyvoice-minicpmo)

    utils = types.ModuleType("matcha.utils")
    utils.__path__ = []  # type: ignore[attr-defined]
    pylogger = types.ModuleType("matcha.utils.pylogger")
    pylogger.get_pylogger = lambda name=__name__: logging.getLogger(name)
    sys.modules["matcha.utils"] = utils
    sys.modules["matcha.utils.pylogger"] = pylogger


_install_matcha_logger_shim()

from cosyvoice.hifigan.f0_predictor import (  # noqa: E402
    ConvRNNF0Predictor as RefF0Predictor,
)
from cosyvoice.hifigan.generator import HiFTGenerator as RefHiFT  # noqa: E402

from vllm.model_executor.models.cosyvoice_hift import (  # noqa: E402
    HiFTConfig,
    HiFTGenerator,
    load_hift,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- HiFT ----
HIFT_KW = dict(
    in_channels=80,
    base_channels=32,
    nb_harmonics=8,
    sampling_rate=24000,
    nsf_alpha=0.1,
    nsf_sigma=0.003,
    nsf_voiced_threshold=10,
    upsample_rates=[8, 5, 3],
    upsample_kernel_sizes=[16, 11, 7],
    istft_params={"n_fft": 16, "hop_len": 4},
    resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    source_resblock_kernel_sizes=[7, 7, 11],
    source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    lrelu_slope=0.1,
    audio_limit=0.99,
)
F0_COND = 16


def _hift_config() -> HiFTConfig:
    d = dict(HIFT_KW)
    d["f0_predictor"] = {"num_class": 1, "in_channels": 80, "cond_channels": F0_COND}
    return HiFTConfig.from_dict(d)


@pytest.fixture(scope="module")
def ref_hift() -> RefHiFT:
    torch.manual_seed(0)
    ref = RefHiFT(**HIFT_KW, f0_predictor=RefF0Predictor(1, 80, F0_COND)).eval()
    with torch.no_grad():
        # The original init (N(0, 0.01) convs) gives f0 ~ 0, i.e. an all
        # unvoiced excitation; spread the weights and put f0 around a few
        # hundred Hz so that both voiced and unvoiced frames occur.
        for name, p in ref.named_parameters():
            if "alpha" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() > 1:
                p.normal_(0.0, 0.5 / max(1, p[0].numel()) ** 0.5)
        ref.f0_predictor.classifier.weight.normal_(0.0, 150.0)
        ref.f0_predictor.classifier.bias.fill_(15.0)
    return ref


def _mel(b: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 80, t, generator=g)


@pytest.mark.parametrize("fold", [False, True])
def test_hift_parity(ref_hift, tmp_path, fold):
    path = tmp_path / "hift.pt"
    torch.save(ref_hift.state_dict(), path)
    ours = load_hift(
        torch.load(path, weights_only=True), _hift_config(), fold_weight_norm=fold
    )
    mel = _mel(2, 12, 1)
    f0 = ref_hift.f0_predictor(mel)
    voiced = (f0 > 10).float().mean().item()
    assert 0.05 < voiced < 0.95, voiced  # both excitation branches exercised

    torch.manual_seed(1234)
    ref_wav, ref_src = ref_hift.inference(speech_feat=mel)
    wav, src = ours(mel, generator=torch.Generator().manual_seed(1234))
    assert wav.shape == ref_wav.shape == (2, 12 * 480)
    assert ours.upsample_factor == 480 and ours.sampling_rate == 24000
    assert rel_err(src, ref_src) < 1e-5
    assert rel_err(wav, ref_wav) < 1e-3
    assert wav.abs().max() > 1e-3  # not trivially silent

    # A different noise draw must change the output (the noise is live).
    wav2, _ = ours(mel, generator=torch.Generator().manual_seed(99))
    assert rel_err(wav2, ref_wav) > 1e-3


def test_hift_explicit_noise_and_cache_source(ref_hift):
    ours = load_hift(ref_hift.state_dict(), _hift_config())
    mel = _mel(1, 10, 2)
    # Explicit draws equal to the generator's draws give the same result.
    g = torch.Generator().manual_seed(7)
    phase = torch.rand(1, 9, generator=g)
    noise = torch.empty(1, 9, 10 * 480).transpose(1, 2).normal_(generator=g)
    a, _ = ours(mel, phase_init=phase, noise=noise)
    b, _ = ours(mel, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # cache_source overrides the start of the excitation, as the original.
    cache = torch.randn(1, 1, 3840, generator=g) * 0.1
    torch.manual_seed(5)
    ref_wav, ref_src = ref_hift.inference(speech_feat=mel, cache_source=cache)
    wav, src = ours(mel, cache_source=cache, generator=torch.Generator().manual_seed(5))
    assert torch.equal(src[:, :, :3840], cache)
    assert rel_err(wav, ref_wav) < 1e-3


def test_hift_release_key_variants(ref_hift):
    sd = ref_hift.state_dict()
    mel = _mel(1, 6, 3)
    want, _ = load_hift(sd, _hift_config())(
        mel, generator=torch.Generator().manual_seed(0)
    )
    # ``generator.`` prefix (as saved from the GAN wrapper)
    pref = {"generator." + k: v for k, v in sd.items()}
    # legacy torch.nn.utils.weight_norm names
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in sd.items()
    }
    assert any(k.endswith("weight_g") for k in legacy)
    for variant in (pref, legacy):
        got, _ = load_hift(variant, _hift_config())(
            mel, generator=torch.Generator().manual_seed(0)
        )
        assert torch.allclose(got, want, atol=1e-6)


def test_hift_load_errors(ref_hift):
    sd = dict(ref_hift.state_dict())
    sd.pop("conv_pre.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing keys: conv_pre.bias"):
        load_hift(sd, _hift_config())
    # wrong dims: the default (release) config against a shrunk checkpoint
    with pytest.raises(ValueError, match="shape mismatches"):
        load_hift(ref_hift.state_dict(), HiFTConfig())


# ---------------------------------------------------------------- flow ----
from cosyvoice.flow.decoder import (  # noqa: E402
    CausalConditionalDecoder as RefEstimator,
)
from cosyvoice.flow.flow import CausalMaskedDiffWithXvec as RefFlow  # noqa: E402
from cosyvoice.flow.flow_matching import CausalConditionalCFM as RefCFM  # noqa: E402
from cosyvoice.transformer.upsample_encoder import (  # noqa: E402
    UpsampleConformerEncoder as RefEncoder,
)
from omegaconf import DictConfig  # noqa: E402

from vllm.model_executor.models.cosyvoice_flow import (  # noqa: E402
    CosyVoiceFlowConfig,
    load_flow,
)

VOCAB = 100
# cosyvoice2.yaml's flow section, shrunk where the original allows it (the
# encoder width is hard-coded to 512 in the original, the mel width to 80).
FLOW_YAML = {
    "input_size": 512,
    "output_size": 80,
    "spk_embed_dim": 192,
    "output_type": "mel",
    "vocab_size": VOCAB,
    "input_frame_rate": 25,
    "only_mask_loss": True,
    "token_mel_ratio": 2,
    "pre_lookahead_len": 3,
    "encoder": {
        "output_size": 512,
        "attention_heads": 8,
        "linear_units": 64,
        "num_blocks": 2,
        "dropout_rate": 0.1,
        "positional_dropout_rate": 0.1,
        "attention_dropout_rate": 0.1,
        "normalize_before": True,
        "input_layer": "linear",
        "pos_enc_layer_type": "rel_pos_espnet",
        "selfattention_layer_type": "rel_selfattn",
        "input_size": 512,
        "use_cnn_module": False,
        "macaron_style": False,
        "use_dynamic_chunk": True,
    },
    "decoder": {
        "in_channels": 240,
        "n_spks": 1,
        "spk_emb_dim": 80,
        "cfm_params": {
            "content": {
                "sigma_min": 1e-06,
                "solver": "euler",
                "t_scheduler": "cosine",
                "training_cfg_rate": 0.2,
                "inference_cfg_rate": 0.7,
                "reg_loss_type": "l1",
            }
        },
        "estimator": {
            "in_channels": 320,
            "out_channels": 80,
            "channels": [32],
            "dropout": 0.0,
            "attention_head_dim": 8,
            "n_blocks": 1,
            "num_mid_blocks": 2,
            "num_heads": 2,
            "act_fn": "gelu",
            "static_chunk_size": 50,
            "num_decoding_left_chunks": 2,
        },
    },
}


def _build_ref_flow(yaml: dict) -> RefFlow:
    enc_kw = dict(yaml["encoder"])
    dec = yaml["decoder"]
    est = RefEstimator(**dec["estimator"])
    cfm = RefCFM(
        in_channels=dec["in_channels"],
        n_spks=dec["n_spks"],
        spk_emb_dim=dec["spk_emb_dim"],
        cfm_params=DictConfig(dec["cfm_params"]["content"]),
        estimator=est,
    )
    top = {k: v for k, v in yaml.items() if k not in ("encoder", "decoder")}
    flow = RefFlow(**top, encoder=RefEncoder(**enc_kw), decoder=cfm)
    torch.manual_seed(11)  # (RefCFM's constructor reseeds the global RNG)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.1)
    return flow.eval()


@pytest.fixture(scope="module")
def ref_flow() -> RefFlow:
    return _build_ref_flow(FLOW_YAML)


def _flow_inputs(n_prompt: int, n_tok: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    prompt_token = torch.randint(
        0, VOCAB, (1, n_prompt), generator=g, dtype=torch.int32
    )
    token = torch.randint(0, VOCAB, (1, n_tok), generator=g, dtype=torch.int32)
    prompt_feat = torch.randn(1, 2 * n_prompt, 80, generator=g)
    embedding = torch.randn(1, 192, generator=g)
    return token, prompt_token, prompt_feat, embedding


def _ref_flow_call(
    ref, token, prompt_token, prompt_feat, embedding, streaming, finalize
):
    i32 = torch.int32
    mel, _ = ref.inference(
        token=token,
        token_len=torch.tensor([token.shape[1]], dtype=i32),
        prompt_token=prompt_token,
        prompt_token_len=torch.tensor([prompt_token.shape[1]], dtype=i32),
        prompt_feat=prompt_feat,
        prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=i32),
        embedding=embedding,
        streaming=streaming,
        finalize=finalize,
    )
    return mel


def test_flow_config_from_yaml():
    cfg = CosyVoiceFlowConfig.from_dict(FLOW_YAML)
    assert cfg.inference_cfg_rate == 0.7 and cfg.t_scheduler == "cosine"
    assert cfg.n_timesteps == 10 and cfg.vocab_size == VOCAB
    assert cfg.encoder.num_blocks == 2 and cfg.encoder.static_chunk_size == 0
    assert cfg.estimator.channels == [32]
    assert cfg.estimator.static_chunk_size == 50


@pytest.mark.parametrize("n_prompt,n_tok", [(6, 9), (0, 7)])
def test_flow_parity_offline(ref_flow, tmp_path, n_prompt, n_tok):
    path = tmp_path / "flow.pt"
    torch.save(ref_flow.state_dict(), path)
    ours = load_flow(
        torch.load(path, weights_only=True), CosyVoiceFlowConfig.from_dict(FLOW_YAML)
    )
    args = _flow_inputs(n_prompt, n_tok, seed=n_tok)
    want = _ref_flow_call(ref_flow, *args, streaming=False, finalize=True)
    got = ours(*args, streaming=False, finalize=True)
    assert got.shape == want.shape == (1, 80, 2 * n_tok)
    assert rel_err(got, want) < 1e-3
    assert ours.token_rate == 25 and ours.mel_rate == 50


def test_flow_parity_streaming_chunk(ref_flow):
    """One streaming (not finalized) flow call with chunk masks active."""
    yaml = {
        **FLOW_YAML,
        "encoder": {**FLOW_YAML["encoder"], "static_chunk_size": 4},
        "decoder": {
            **FLOW_YAML["decoder"],
            "estimator": {**FLOW_YAML["decoder"]["estimator"], "static_chunk_size": 6},
        },
    }
    ref = _build_ref_flow(yaml)
    ours = load_flow(ref.state_dict(), CosyVoiceFlowConfig.from_dict(yaml))
    args = _flow_inputs(5, 12, seed=3)
    for streaming, finalize in ((True, False), (True, True), (False, False)):
        want = _ref_flow_call(ref, *args, streaming, finalize)
        got = ours(*args, streaming=streaming, finalize=finalize)
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-3, (streaming, finalize)
    # the chunk masks matter: streaming output differs from full context
    full = ours(*args, streaming=False, finalize=False)
    part = ours(*args, streaming=True, finalize=False)
    assert rel_err(part, full) > 1e-3


def test_flow_load_errors(ref_flow):
    sd = dict(ref_flow.state_dict())
    sd.pop("encoder_proj.weight")
    with pytest.raises(ValueError, match="missing keys: encoder_proj.weight"):
        load_flow(sd, CosyVoiceFlowConfig.from_dict(FLOW_YAML))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_flow(
            ref_flow.state_dict(),
            CosyVoiceFlowConfig.from_dict({**FLOW_YAML, "vocab_size": VOCAB + 1}),
        )


# ----------------------------------------------------- token2wav (CV2) ----
from cosyvoice.cli.model import CosyVoice2Model as RefCV2Model  # noqa: E402

from vllm.model_executor.models.cosyvoice_token2wav import (  # noqa: E402
    CosyVoice2Token2Wav,
    load_cosyvoice_yaml,
    push_streams,
)

STREAM_FLOW_YAML = {
    **FLOW_YAML,
    "encoder": {**FLOW_YAML["encoder"], "static_chunk_size": 25},
}


def _ref_cv2(ref_flow, ref_hift) -> RefCV2Model:
    return RefCV2Model(None, ref_flow, ref_hift, fp16=False)


def _ref_tts(
    model: RefCV2Model,
    tokens,
    prompt_token,
    prompt_feat,
    embedding,
    stream: bool,
    speed: float = 1.0,
):
    """Drive the original CosyVoice2Model.tts with a finished token list in
    place of its LLM thread."""

    def fake_llm_job(text, prompt_text, llm_prompt_speech_token, llm_embedding, uuid):
        model.tts_speech_token_dict[uuid] = [int(t) for t in tokens[0]]
        model.llm_end_dict[uuid] = True

    model.llm_job = fake_llm_job
    return [
        out["tts_speech"]
        for out in model.tts(
            flow_embedding=embedding,
            flow_prompt_speech_token=prompt_token,
            prompt_speech_feat=prompt_feat,
            stream=stream,
            speed=speed,
        )
    ]


@pytest.fixture(scope="module")
def stream_models(ref_hift):
    ref_flow = _build_ref_flow(STREAM_FLOW_YAML)
    ours = CosyVoice2Token2Wav(
        load_flow(
            ref_flow.state_dict(), CosyVoiceFlowConfig.from_dict(STREAM_FLOW_YAML)
        ),
        load_hift(ref_hift.state_dict(), _hift_config()),
    )
    return _ref_cv2(ref_flow, ref_hift), ours


def test_token2wav_streaming_parity(stream_models):
    ref, ours = stream_models
    assert ours.sample_rate == 24000 and ours.token_rate == 25
    assert ours.samples_per_token == 960
    token, prompt_token, prompt_feat, embedding = _flow_inputs(10, 100, 21)

    torch.manual_seed(77)
    want = _ref_tts(ref, token, prompt_token, prompt_feat, embedding, stream=True)
    sess = ours.stream(
        prompt_token,
        prompt_feat,
        embedding,
        generator=torch.Generator().manual_seed(77),
    )
    got = sess.push(token[0].tolist(), final=True)
    # 10 prompt tokens -> first hop 25 + 15 pad; hops at 40, 65, 90, final
    assert len(want) == 4
    assert [c.shape for c in got] == [c.shape for c in want]
    assert sum(c.shape[1] for c in got) == 100 * 960
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-3
    assert rel_err(torch.cat(got, 1), torch.cat(want, 1)) < 1e-3


def test_token2wav_incremental_push(stream_models):
    """Tokens arriving piecemeal give the same chunks as the original's
    loop would while the LLM is still running."""
    _, ours = stream_models
    token, prompt_token, prompt_feat, embedding = _flow_inputs(0, 60, 5)
    toks = token[0].tolist()
    sess = ours.stream(
        prompt_token, prompt_feat, embedding, generator=torch.Generator().manual_seed(1)
    )
    chunks = []
    for i in range(0, 60, 7):
        chunks += sess.push(toks[i : i + 7])
    n_stream = len(chunks)
    chunks += sess.finish()
    # no prompt: hops at 25 and 50 need 28 and 53 tokens; then the final
    assert n_stream == 2 and len(chunks) == 3
    assert [c.shape[1] for c in chunks[:2]] == [25 * 960 - 3840, 25 * 960]
    assert sum(c.shape[1] for c in chunks) == 60 * 960
    with pytest.raises(RuntimeError):
        sess.push([1])


@pytest.mark.parametrize("speed", [1.0, 1.25])
def test_token2wav_offline_parity(stream_models, speed):
    ref, ours = stream_models
    token, prompt_token, prompt_feat, embedding = _flow_inputs(8, 30, 4)
    torch.manual_seed(3)
    (want,) = _ref_tts(
        ref, token, prompt_token, prompt_feat, embedding, stream=False, speed=speed
    )
    got = ours.synthesize(
        token,
        prompt_token,
        prompt_feat,
        embedding,
        speed=speed,
        generator=torch.Generator().manual_seed(3),
    )
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-3


_RELEASE_YAML = """\
# hyperpyyaml as in the CosyVoice2 release, shrunk dims
__set_seed1: !apply:random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
sample_rate: 24000
llm_input_size: 896
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 100
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: 8
        linear_units: 64
        num_blocks: 2
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: True
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [32]
            dropout: 0.0
            attention_head_dim: 8
            n_blocks: 1
            num_mid_blocks: 2
            num_heads: 2
            act_fn: 'gelu'
            static_chunk_size: !ref <token_frame_rate> * <token_mel_ratio>
            num_decoding_left_chunks: 2

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 32
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 16

feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    sampling_rate: !ref <sample_rate>
"""


def test_token2wav_from_release_dir(stream_models, ref_hift, tmp_path):
    ref, _ = stream_models
    (tmp_path / "cosyvoice2.yaml").write_text(_RELEASE_YAML)
    torch.save(ref.flow.state_dict(), tmp_path / "flow.pt")
    torch.save(
        {"generator." + k: v for k, v in ref_hift.state_dict().items()},
        tmp_path / "hift.pt",
    )
    conf = load_cosyvoice_yaml(str(tmp_path / "cosyvoice2.yaml"))
    assert conf["sample_rate"] == 24000
    assert conf["flow"]["decoder"]["estimator"]["static_chunk_size"] == 50
    assert conf["flow"]["encoder"]["static_chunk_size"] == 25
    assert conf["hift"]["sampling_rate"] == 24000

    model = CosyVoice2Token2Wav.from_pretrained(str(tmp_path))
    assert model.flow.config.estimator.channels == [32]
    assert model.hift.config.base_channels == 32
    token, prompt_token, prompt_feat, embedding = _flow_inputs(4, 20, 8)
    torch.manual_seed(9)
    (want,) = _ref_tts(ref, token, prompt_token, prompt_feat, embedding, stream=False)
    got = model.synthesize(
        token,
        prompt_token,
        prompt_feat,
        embedding,
        generator=torch.Generator().manual_seed(9),
    )
    assert rel_err(got, want) < 1e-3

    (tmp_path / "cosyvoice2.yaml").write_text(
        _RELEASE_YAML.replace("base_channels: 32", "base_channels: 64")
    )
    with pytest.raises(ValueError, match="hift.pt: state dict does not"):
        CosyVoice2Token2Wav.from_pretrained(str(tmp_path))


# ------------------------------------------------ release-size key sets ----
RELEASE_FLOW_YAML = {
    **FLOW_YAML,
    "vocab_size": 6561,
    "encoder": {**FLOW_YAML["encoder"], "linear_units": 2048, "num_blocks": 6},
    "decoder": {
        **FLOW_YAML["decoder"],
        "estimator": {
            **FLOW_YAML["decoder"]["estimator"],
            "channels": [256],
            "attention_head_dim": 64,
            "n_blocks": 4,
            "num_mid_blocks": 12,
            "num_heads": 8,
        },
    },
}


def _shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_release_dims_key_sets_match():
    """At cosyvoice2.yaml's real dims, our parameter names and shapes are
    exactly the original's (built on the meta device: no weights)."""
    from vllm.model_executor.models.cosyvoice_flow import CausalMaskedDiffWithXvec

    with torch.device("meta"):
        ref_flow = RefFlow(
            **{
                k: v
                for k, v in RELEASE_FLOW_YAML.items()
                if k not in ("encoder", "decoder")
            },
            encoder=RefEncoder(**RELEASE_FLOW_YAML["encoder"]),
            decoder=RefCFM(
                in_channels=240,
                n_spks=1,
                spk_emb_dim=80,
                cfm_params=DictConfig(FLOW_YAML["decoder"]["cfm_params"]["content"]),
                estimator=RefEstimator(**RELEASE_FLOW_YAML["decoder"]["estimator"]),
            ),
        )
        ours_flow = CausalMaskedDiffWithXvec(
            CosyVoiceFlowConfig.from_dict(RELEASE_FLOW_YAML)
        )
        ref_h = RefHiFT(
            **{**HIFT_KW, "base_channels": 512}, f0_predictor=RefF0Predictor(1, 80, 512)
        )
        ours_h = HiFTGenerator(HiFTConfig())
    assert _shapes(ours_flow) == _shapes(ref_flow)
    assert _shapes(ours_h) == _shapes(ref_h)
    assert CosyVoiceFlowConfig() == CosyVoiceFlowConfig.from_dict(
        {
            **RELEASE_FLOW_YAML,
            "decoder": {
                **RELEASE_FLOW_YAML["decoder"],
                "estimator": {
                    **RELEASE_FLOW_YAML["decoder"]["estimator"],
                    "static_chunk_size": 50,
                },
            },
        }
    )


@pytest.mark.parametrize("n_prompt,n_tok", [(3, 8)])
def test_flow_parity_two_level_unet(tmp_path, n_prompt, n_tok):
    """A UNet with two resolutions (strided down/up-sampling blocks)."""
    yaml = {
        **FLOW_YAML,
        "decoder": {
            **FLOW_YAML["decoder"],
            "estimator": {**FLOW_YAML["decoder"]["estimator"], "channels": [16, 24]},
        },
    }
    ref = _build_ref_flow(yaml)
    ours = load_flow(ref.state_dict(), CosyVoiceFlowConfig.from_dict(yaml))
    args = _flow_inputs(n_prompt, n_tok, seed=2)
    want = _ref_flow_call(ref, *args, streaming=False, finalize=True)
    assert rel_err(ours(*args), want) < 1e-3


def test_flow_batch_matches_single_reference(ref_flow):
    """Padded batched flow == the original run on each utterance alone."""
    ours = load_flow(ref_flow.state_dict(), CosyVoiceFlowConfig.from_dict(FLOW_YAML))
    items = [_flow_inputs(p, n, seed=40 + n) for p, n in ((4, 11), (0, 6), (7, 3))]
    got = ours.forward_batch(
        [t[0][0] for t in items],
        [t[1][0] for t in items],
        [t[2][0] for t in items],
        torch.cat([t[3] for t in items]),
    )
    for (token, prompt_token, prompt_feat, emb), g in zip(items, got):
        want = _ref_flow_call(
            ref_flow,
            token,
            prompt_token,
            prompt_feat,
            emb,
            streaming=False,
            finalize=True,
        )
        assert g.shape == want[0].shape
        assert rel_err(g, want[0]) < 1e-3


def test_token2wav_batch(stream_models):
    ref, ours = stream_models
    items = [_flow_inputs(p, n, seed=60 + n) for p, n in ((5, 12), (2, 20))]
    got = ours.synthesize_batch(
        [t[0][0] for t in items],
        [t[1][0] for t in items],
        [t[2][0] for t in items],
        torch.cat([t[3] for t in items]),
        generators=[torch.Generator().manual_seed(s) for s in (1, 2)],
    )
    for (token, prompt_token, prompt_feat, emb), g, s in zip(items, got, (1, 2)):
        torch.manual_seed(s)
        (want,) = _ref_tts(ref, token, prompt_token, prompt_feat, emb, stream=False)
        assert g.shape == want.shape
        assert rel_err(g, want) < 1e-3


def _record_batches(model) -> list[int]:
    """Sizes of the token2wav_batch calls made on ``model`` from now on."""
    sizes: list[int] = []
    inner = model.token2wav_batch

    def spy(jobs):
        sizes.append(len(jobs))
        return inner(jobs)

    model.token2wav_batch = spy
    return sizes


def test_push_streams_batches_sessions(stream_models):
    """Concurrent streaming sessions decoded in batches (padded flow,
    batched HiFT with each session's own noise) give each session the
    original's chunks; a failing session does not fail the others."""
    ref, ours = stream_models
    cases = [(10, 100, 81), (10, 90, 82), (0, 60, 83)]
    items = [_flow_inputs(p, n, seed) for p, n, seed in cases]
    sessions = [
        ours.stream(pt, pf, emb, generator=torch.Generator().manual_seed(seed))
        for (_, pt, pf, emb), (_, _, seed) in zip(items, cases)
    ]
    bad = ours.stream(*items[0][1:], generator=torch.Generator().manual_seed(0))
    streams = sessions + [bad]
    toks = [t[0][0].tolist() for t in items] + [[VOCAB + 5] * 100]
    sizes = _record_batches(ours)
    try:
        got: list[list] = [[] for _ in sessions]
        failed = None
        for i in range(0, 100, 9):
            outs = push_streams(
                streams, [t[i : i + 9] for t in toks], [False] * len(streams)
            )
            for g, o in zip(got, outs[:3]):
                g += o
            if len(outs) == 4 and isinstance(outs[3], BaseException):
                failed = outs[3]
                streams, toks = streams[:3], toks[:3]
        assert failed is not None and "out of range" in str(failed)
        for g, o in zip(got, push_streams(sessions, [[]] * 3, [True] * 3)):
            g += o
    finally:
        del ours.token2wav_batch
    assert max(sizes) >= 3, sizes  # the chunks really were batched
    for (token, pt, pf, emb), (_, _, seed), g in zip(items, cases, got):
        torch.manual_seed(seed)
        want = _ref_tts(ref, token, pt, pf, emb, stream=True)
        assert [c.shape for c in g] == [c.shape for c in want]
        for a, b in zip(g, want):
            assert rel_err(a, b) < 1e-3
    with pytest.raises(ValueError, match="twice"):
        push_streams([sessions[0], sessions[0]], [[], []], [False, False])
    assert all(s.finished for s in sessions)
    assert isinstance(push_streams(sessions[:1], [[1]], [False])[0], RuntimeError)


def test_flow_batch_streaming_chunks(stream_models):
    """Padded streaming (non-final) chunks == each chunk alone."""
    _, ours = stream_models
    items = [_flow_inputs(p, n, seed=90 + n) for p, n in ((10, 43), (0, 28), (3, 31))]
    got = ours.flow.forward_batch(
        [t[0][0] for t in items],
        [t[1][0] for t in items],
        [t[2][0] for t in items],
        torch.cat([t[3] for t in items]),
        streaming=True,
        finalize=False,
    )
    for (token, pt, pf, emb), g in zip(items, got):
        want = ours.flow(token, pt, pf, emb, streaming=True, finalize=False)
        assert g.shape == want[0].shape
        assert rel_err(g, want[0]) < 1e-3


def test_decode_worker_streams_in_rounds(stream_models):
    """The API server's decode worker serves streaming sessions in rounds:
    a session that brings all its tokens at once gets its chunks one per
    round (each sent as soon as it is decoded) and shares the rounds with
    a session that starts later and brings tokens piecemeal; every session
    still gets the original's chunks. A failing session fails alone, and
    a session whose reader goes away is dropped."""
    import asyncio
    from contextlib import aclosing

    import numpy as np

    from vllm.entrypoints.text_to_speech.serving import DecodeWorker
    from vllm.model_executor.models.cosyvoice2 import (
        CosyVoice2DecoderStream,
        CosyVoice2SpeechDecoder,
    )

    class Decoder:  # the round logic of CosyVoice2SpeechDecoder, no release dir
        decode_streams = CosyVoice2SpeechDecoder.decode_streams

    ref, ours = stream_models
    cases = [(10, 100, 91), (0, 70, 92)]
    items = [_flow_inputs(p, n, seed) for p, n, seed in cases]

    def session(i: int, seed: int | None = None) -> CosyVoice2DecoderStream:
        _, pt, pf, emb = items[i]
        g = torch.Generator().manual_seed(cases[i][2] if seed is None else seed)
        return CosyVoice2DecoderStream(ours.stream(pt, pf, emb, generator=g))

    rounds: list[list[int]] = []
    inner = Decoder.decode_streams

    def spy(self, sessions, frames):
        rounds.append([id(s) for s in sessions])
        return inner(self, sessions, frames)

    Decoder.decode_streams = spy
    sizes = _record_batches(ours)
    worker = DecodeWorker(Decoder())
    toks = [np.asarray(t[0][0]) for t in items]

    async def drain(s, frames) -> list[np.ndarray]:
        return [c async for c in worker.stream(s, frames)]

    async def run():
        a, b = session(0), session(1)
        # a: every token at once (three chunks + the rest at finish)
        a_task = asyncio.ensure_future(drain(a, toks[0]))
        got_b: list[np.ndarray] = []
        await asyncio.sleep(0)
        for i in range(0, 70, 30):  # b: piecemeal, while a is decoding
            got_b += await drain(b, toks[1][i : i + 30])
        got_a = await a_task
        got_a += await drain(a, None)
        got_b += await drain(b, None)

        bad = session(0, seed=0)
        with pytest.raises(Exception, match="out of range"):
            await drain(bad, np.full(60, VOCAB + 5))
        # a reader that leaves after the first chunk: the rest is dropped
        gone = session(0, seed=1)
        async with aclosing(worker.stream(gone, toks[0])) as it:
            async for _ in it:
                break
        await drain(session(1), toks[1][:5])  # a round after the drop
        return a, got_a, got_b, gone

    try:
        a, got_a, got_b, gone = asyncio.run(run())
    finally:
        del ours.token2wav_batch
        Decoder.decode_streams = inner
    assert max(sizes) >= 2, sizes  # a and b shared rounds
    # one chunk of a per round: a was in a round per chunk it got
    assert sum(id(a) in r for r in rounds) >= 4
    # a's three chunks end at 40 (hop + prompt padding), 65, 90: the one
    # read and at most the round that was running when the reader left
    assert gone.stream.token_offset <= 65
    for (token, pt, pf, emb), (_, _, seed), got in zip(items, cases, (got_a, got_b)):
        torch.manual_seed(seed)
        want = _ref_tts(ref, token, pt, pf, emb, stream=True)
        assert [c.size for c in got] == [c.numel() for c in want]
        for x, y in zip(got, want):
            assert rel_err(torch.from_numpy(x), y.reshape(-1)) < 1e-3
