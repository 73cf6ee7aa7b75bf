# SPDX-License-Identifier: Apache-2.0
"""Fish Speech codecs vs the original implementation.

Modded DAC (OpenAudio S1/S2): the oracle is ``fish-speech==0.1.0`` (the S1
code) on top of ``descript-audio-codec``; a tiny random codec is built with
the original classes and saved as ``codec.pth`` exactly as the release file
is keyed (including S1's persistent ``causal_mask`` / ``freqs_cis``
buffers), then loaded with ``vllm.model_executor.models.fish_speech_codec``.

Firefly-GAN-VQ (fish-speech 1.5): no package holds that code, so the oracle
is a golden fixture produced once from fish-speech v1.5.1 by
``fixtures/fish15_firefly/make_fixture.py`` (commit in ``COMMIT`` there).
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm.model_executor.models.fish_speech_codec import (
    FireflyConfig,
    FireflyGANVQ,
    FishDAC,
    FishDACConfig,
)

sys.path.insert(0, str(Path(os.path.realpath(__file__)).parents[3] / "tools"))
import make_fish_codec  # noqa: E402

FRAME = 2048
QUANT_WINDOW = make_fish_codec.QUANT_WINDOW
_reference_dac = make_fish_codec.reference_dac


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def dac_files(tmp_path_factory):
    ref = _reference_dac()
    path = tmp_path_factory.mktemp("s1codec") / "codec.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def _random_codes(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [
            torch.randint(0, 4096, (b, 1, t), generator=g),
            torch.randint(0, 1024, (b, 9, t), generator=g),
        ],
        1,
    )


def _test_audio(b: int, n: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 44100
    f = 100 + 400 * torch.rand(b, 1, 1, generator=g)
    return 0.5 * torch.sin(2 * torch.pi * f * t) + 0.05 * torch.randn(
        b, 1, n, generator=g
    )


def _load(path, **kw) -> FishDAC:
    return FishDAC.from_pretrained(path, quantizer_window_size=QUANT_WINDOW, **kw)


# ---------------------------------------------------------------- modded DAC


def test_dac_default_config_matches_release_layout():
    """FishDAC() at default sizes has exactly the tensors (names and shapes)
    of the original DAC built from modded_dac_vq.yaml, except S1's mask and
    rope buffers; and the sizes read back from such a state dict are the
    defaults."""
    import os

    import fish_speech.models.dac.modded_dac as md
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    yaml = os.path.join(
        os.path.dirname(md.__file__), "..", "..", "configs", "modded_dac_vq.yaml"
    )
    with torch.device("meta"):
        ref = instantiate(OmegaConf.load(yaml))
        ours = FishDAC()
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    skipped = {k for k in ref_shapes if k.endswith(("causal_mask", "freqs_cis"))}
    assert len(skipped) == 6
    assert {k: v for k, v in ref_shapes.items() if k not in skipped} == our_shapes
    assert FishDACConfig.from_state_dict(ref.state_dict()) == FishDACConfig()
    n_params = sum(p.numel() for p in ours.parameters())
    assert 385e6 < n_params < 395e6


def test_dac_attributes(dac_files):
    _, path = dac_files
    codec = _load(path)
    assert codec.sample_rate == 44100
    assert codec.hop_length == 512
    assert codec.frame_length == 2048
    assert codec.frame_rate == pytest.approx(44100 / 2048)
    assert codec.num_codebooks == 10


def test_dac_decode_parity(dac_files):
    ref, path = dac_files
    codec = _load(path)
    assert codec.config.latent_dim == 128
    assert codec.config.decoder_rates == (8, 8, 4, 2)
    assert codec.config.quantizer_transformer.n_layer == 2
    t = 3 * QUANT_WINDOW + 2  # longer than the attention window
    codes = _random_codes(2, t)
    with torch.no_grad():
        expected, lengths = ref.decode(codes, torch.tensor([t, t]))
    audio = codec.decode(codes)
    assert audio.shape == (2, 1, t * FRAME) == expected.shape
    # the random codec must produce a real signal, not tanh saturation
    assert 0.02 < expected.std() < 0.5
    assert _rel_err(audio, expected) <= 1e-3
    # 2-D codes [10, T] are one batch item
    assert _rel_err(codec.decode(codes[1]), expected[1:]) <= 1e-3


def test_dac_decode_only_loader(dac_files):
    ref, path = dac_files
    codec = _load(path, with_encoder=False)
    assert codec.encoder is None
    codes = _random_codes(1, 4, seed=7)
    with torch.no_grad():
        expected, _ = ref.decode(codes, torch.tensor([4]))
    assert _rel_err(codec.decode(codes), expected) <= 1e-3
    with pytest.raises(RuntimeError, match="without its encoder"):
        codec.encode(torch.zeros(1, 1, FRAME))


def test_dac_loader_rejects_bad_weights(dac_files, tmp_path):
    _, path = dac_files
    sd = torch.load(path, weights_only=True)
    # wrapped as a training checkpoint: also accepted
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"generator.{k}": v for k, v in sd.items()}}, wrapped)
    _load(wrapped)

    config = _load(path).config

    # S2 layout: the same tensors without S1's persistent mask / rope
    s2 = tmp_path / "s2_codec.pth"
    torch.save(
        {k: v for k, v in sd.items() if not k.endswith(("causal_mask", "freqs_cis"))},
        s2,
    )
    codes = _random_codes(1, 3, seed=5)
    assert torch.equal(_load(s2).decode(codes), _load(path).decode(codes))

    missing = dict(sd)
    del missing["decoder.model.2.block.1.conv.parametrizations.weight.original0"]
    with pytest.raises(ValueError, match="missing.*decoder.model.2.block.1"):
        FishDAC(config).load_codec_state_dict(missing)

    bad_shape = dict(sd)
    bad_shape["quantizer.quantizer.quantizers.3.codebook.weight"] = torch.zeros(1024, 4)
    with pytest.raises(ValueError, match="shape mismatch.*quantizers.3"):
        FishDAC(config).load_codec_state_dict(bad_shape)

    extra = dict(sd)
    extra["decoder.model.9.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="unexpected.*decoder.model.9"):
        FishDAC(config).load_codec_state_dict(extra)


def test_dac_encode_parity(dac_files):
    ref, path = dac_files
    codec = _load(path)
    # > 512 encoder-transformer steps (hop 512), so its window matters too;
    # the length is not a whole number of frames (right-padded like the
    # original)
    n = 130 * FRAME + 777
    audio = _test_audio(2, n)
    with torch.no_grad():
        expected, _ = ref.encode(audio)
    codes = codec.encode(audio)
    assert codes.shape == (2, 10, 131) == expected.shape
    # nearest-codebook search on identical float computations: identical
    assert torch.equal(codes, expected)
    assert codes[:, 0].max() < 4096 and codes[:, 1:].max() < 1024
    # several distinct codes: the test is not degenerate
    assert codes[0, 0].unique().numel() > 5
    assert torch.equal(codec.encode(audio[:, 0]), expected)


@pytest.mark.parametrize("chunks", [[1] * 12, [3, 4, 5], [7, 1, 2, 2], [12]])
def test_dac_streaming_decode(dac_files, chunks):
    _, path = dac_files
    codec = _load(path)
    t = sum(chunks)
    codes = _random_codes(2, t, seed=11)
    full = codec.decode(codes)
    stream = codec.streaming_decoder()
    pieces, start = [], 0
    for n in chunks:
        piece = stream.decode(codes[:, :, start : start + n])
        assert piece.shape == (2, 1, n * FRAME)
        pieces.append(piece)
        start += n
    assert stream.frames == t
    joined = torch.cat(pieces, dim=-1)
    assert (joined - full).abs().max().item() <= 1e-5
    assert _rel_err(joined, full) <= 1e-5
    # a reset stream starts over
    stream.reset()
    assert _rel_err(stream.decode(codes[:, :, :3]), full[..., : 3 * FRAME]) <= 1e-5


def test_dac_streaming_needs_its_state(dac_files):
    """Without the carried state a chunk differs from the one-shot output
    (so the streaming test above can fail)."""
    _, path = dac_files
    codec = _load(path)
    codes = _random_codes(1, 10, seed=12)
    full = codec.decode(codes)
    fresh = codec.decode(codes[:, :, 6:])
    assert _rel_err(fresh, full[..., 6 * FRAME :]) > 1e-2


def test_dac_bad_codes(dac_files):
    _, path = dac_files
    codec = _load(path)
    codes = _random_codes(1, 5)
    bad = codes.clone()
    bad[0, 0, 2] = 4096
    with pytest.raises(ValueError, match="semantic codes"):
        codec.decode(bad)
    bad = codes.clone()
    bad[0, 4, 1] = 1024
    with pytest.raises(ValueError, match="residual codes"):
        codec.decode(bad)
    bad = codes.clone()
    bad[0, 3, 0] = -1
    with pytest.raises(ValueError, match="residual codes"):
        codec.decode(bad)
    with pytest.raises(ValueError, match=r"\[B, 10, T\]"):
        codec.decode(codes[:, :8])
    with pytest.raises(ValueError, match=r"\[B, 10, T\]"):
        codec.decode(codes[None])
    with pytest.raises(ValueError, match="no frames"):
        codec.decode(codes[..., :0])
    with pytest.raises(TypeError, match="integers"):
        codec.decode(codes.float())
    with pytest.raises(ValueError, match="semantic codes"):
        codec.streaming_decoder().decode(codes + 5000)


# ------------------------------------------------------ firefly-gan-vq (1.5)

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "fish15_firefly")


@pytest.fixture(scope="module")
def firefly(tmp_path_factory):
    fx = torch.load(os.path.join(FIXTURE_DIR, "firefly_tiny.pt"), weights_only=True)
    with open(os.path.join(FIXTURE_DIR, "COMMIT")) as f:
        assert f.read().split()[0] == fx["commit"]
    # the release file format: a plain fp32 state dict
    path = (
        tmp_path_factory.mktemp("firefly")
        / "firefly-gan-vq-fsq-8x1024-21hz-generator.pth"
    )
    torch.save({k: v.float() for k, v in fx["state_dict_bf16"].items()}, path)
    return fx, path


def test_firefly_config_from_file(firefly):
    fx, path = firefly
    codec = FireflyGANVQ.from_pretrained(path.parent)
    cfg = codec.config
    assert cfg.latent_dim == 40 and cfg.fsq_groups == 8
    assert cfg.upsample_rates == (8, 8, 2, 2, 2)
    assert cfg.upsample_kernel_sizes == (16, 16, 4, 4, 4)
    assert cfg.backbone_dims == (8, 16, 16, 40)
    assert cfg.backbone_depths == (1, 1, 1, 1)
    assert codec.sample_rate == 44100 and codec.frame_length == 2048
    assert codec.hop_length == 512
    assert codec.frame_rate == pytest.approx(44100 / 2048)
    assert codec.num_codebooks == 8 and codec.codebook_size == 1000


def test_firefly_default_config_matches_release_layout(firefly):
    """FireflyGANVQ() at default sizes has exactly the tensors (names and
    shapes) of the original codec built from firefly_gan_vq.yaml at v1.5.1
    (recorded in the fixture), and those shapes read back as the defaults."""
    fx, _ = firefly
    release = {k: tuple(v) for k, v in fx["release_shapes"].items()}
    codec = FireflyGANVQ()
    ours = {k: tuple(v.shape) for k, v in codec.state_dict().items()}
    assert ours == release
    n_params = sum(p.numel() for p in codec.parameters())
    assert 46e6 < n_params < 47.5e6  # the 189 MB fp32 release file
    meta = {k: torch.empty(v, device="meta") for k, v in release.items()}
    assert FireflyConfig.from_state_dict(meta) == FireflyConfig()


def test_firefly_decode_parity(firefly):
    fx, path = firefly
    codec = FireflyGANVQ.from_pretrained(path, with_encoder=False)
    codes = fx["codes"]
    expected = fx["audio"]
    audio = codec.decode(codes)
    assert audio.shape == expected.shape == (2, 1, codes.shape[-1] * FRAME)
    assert expected.std() > 0.02 and expected.abs().max() < 0.9
    # the reference zeroes samples past each item's length; the codec is
    # causal, so the valid part does not depend on the frames after it
    for i, n in enumerate(fx["audio_lengths"].tolist()):
        assert _rel_err(audio[i, :, :n], expected[i, :, :n]) <= 1e-3
        assert torch.all(expected[i, :, n:] == 0)


def test_firefly_encode_parity(firefly):
    fx, path = firefly
    codec = FireflyGANVQ.from_pretrained(path)
    signal = fx["signal_pcm16"].float() / 32768
    codes = codec.encode(signal[:, None], fx["signal_lengths"])
    expected = fx["encoded"].long()
    assert codes.shape == expected.shape
    assert torch.equal(codes, expected)
    assert expected.unique().numel() > 5
    # the default length is the whole signal
    full = codec.encode(signal[:1])
    assert torch.equal(full, expected[:1])


def test_firefly_streaming_decode(firefly):
    fx, path = firefly
    codec = FireflyGANVQ.from_pretrained(path, with_encoder=False)
    codes = fx["codes"]
    full = codec.decode(codes)
    stream = codec.streaming_decoder()
    pieces = [stream.decode(codes[:, :, a:b]) for a, b in ((0, 1), (1, 4), (4, 6))]
    joined = torch.cat(pieces, dim=-1)
    assert joined.shape == full.shape
    assert _rel_err(joined, full) <= 1e-5
    # without state a later chunk differs
    assert _rel_err(codec.decode(codes[:, :, 4:]), full[..., 4 * FRAME :]) > 1e-2


def test_firefly_bad_codes_and_weights(firefly, tmp_path):
    fx, path = firefly
    codec = FireflyGANVQ.from_pretrained(path, with_encoder=False)
    codes = fx["codes"]
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        codec.decode(codes + 1000)
    with pytest.raises(ValueError, match=r"\[B, 8, T\]"):
        codec.decode(codes[:, :4])
    with pytest.raises(RuntimeError, match="without its encoder"):
        codec.encode(torch.zeros(1, 4096))
    sd = {k: v.float() for k, v in fx["state_dict_bf16"].items()}
    del sd["head.resblocks.2.blocks.1.convs2.0.conv.bias"]
    with pytest.raises(ValueError, match="missing.*resblocks.2.blocks.1"):
        FireflyGANVQ(
            FireflyConfig.from_state_dict(
                {k: v.float() for k, v in fx["state_dict_bf16"].items()}
            )
        ).load_codec_state_dict(sd)


def test_bf16_weights_run(dac_files, firefly):
    """Both codecs run with bf16 weights (decode, stream, encode) and stay
    close to fp32."""
    _, dac_path = dac_files
    _, ff_path = firefly
    for codec, codes, audio in (
        (_load(dac_path), _random_codes(1, 6, seed=3), _test_audio(1, 9000)),
        (
            FireflyGANVQ.from_pretrained(ff_path),
            torch.randint(0, 1000, (1, 8, 6)),
            _test_audio(1, 9000),
        ),
    ):
        ref = codec.decode(codes)
        codec = codec.to(torch.bfloat16)
        out = codec.decode(codes)
        assert out.dtype == torch.bfloat16
        assert _rel_err(out.float(), ref) < 0.1
        streamed = codec.streaming_decoder().decode(codes)
        assert _rel_err(streamed.float(), ref) < 0.1
        assert codec.encode(audio).shape == (1, codec.num_codebooks, 5)


# ------------------------------------------------- the speech-API decoder
def test_speech_decoder_adapter(dac_files):
    """FishCodecSpeechDecoder: batched decode of unequal lengths equals the
    per-request decode, its stream equals the one-shot decode, and reference
    audio is encoded to [K, T] codes."""
    from vllm.model_executor.models.fish_speech_codec import FishCodecSpeechDecoder

    _, path = dac_files
    dec = FishCodecSpeechDecoder(_load(path))
    assert dec.sample_rate == 44100 and dec.samples_per_frame == 2048
    frames = [_random_codes(1, t, seed=t)[0].T.numpy() for t in (7, 12, 3)]
    batched = dec.decode(frames)
    for f, audio in zip(frames, batched):
        alone = dec.decode([f])[0]
        assert audio.shape == (len(f) * 2048,)
        np.testing.assert_allclose(audio, alone, atol=1e-5)
    session = dec.open_stream()
    streamed = np.concatenate(
        [session.decode(frames[1][a:b]) for a, b in ((0, 2), (2, 3), (3, 9), (9, 12))]
    )
    np.testing.assert_allclose(streamed, batched[1], atol=1e-4)
    voice = dec.encode_reference(_test_audio(1, 3 * 2048)[0, 0].numpy(), 44100, "hi")
    assert voice.codes.shape == (10, 3) and voice.ref_text == "hi"
    with pytest.raises(ValueError, match="44100"):
        dec.encode_reference(np.zeros(100, np.float32), 16000, "hi")
    with pytest.raises(ValueError, match=r"\[T, 10\]"):
        dec.decode([frames[0][:, :3]])
