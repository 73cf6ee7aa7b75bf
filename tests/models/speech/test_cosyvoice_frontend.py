# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CosyVoice text frontend (``cosyvoice_frontend.py``) vs the original, and
long text through the offline API as one LM run per segment.

Oracle: PyPI ``cosyvoice-minicpmo==0.1.0``: ``cosyvoice.utils.frontend_utils``
(``split_paragraph`` and the clean-up helpers, the same file as upstream
CosyVoice's) and ``CosyVoiceFrontEnd.text_normalize`` run without ttsfrd /
wetext (its normalisers as the identity, which is upstream's branch when
neither is installed), ``inflect`` spelling numbers. English lengths count
tokens of the tiny release directory's tokenizer
(``tools/make_cosyvoice2_checkpoint.py``).

One in-process engine (``SpeechSynthesizer``) serves the module.
"""

import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))

from make_cosyvoice2_checkpoint import (  # noqa: E402
    install_matcha_logger_shim,
    make_release_dir,
)

install_matcha_logger_shim()

import cosyvoice.utils.frontend_utils as orig  # noqa: E402

from vllm.model_executor.models import cosyvoice_frontend as fe  # noqa: E402

pytestmark = pytest.mark.skip_global_cleanup

EN_LONG = (
    "The quick brown fox jumps over the lazy dog. "
    "Hello world, this is a tiny demo checkpoint with random weights! "
    "Fish Speech and CosyVoice run in vLLM; speech recognition too. "
    "Pack my box with five dozen liquor jugs. "
) * 3 + "Is that all? Yes."
ZH_LONG = (
    "今天天气很好，我们一起去公园散步吧！你觉得怎么样？"
    "我说：“好的。”他说：“那我们走吧！”公园里有很多花，红的、黄的、白的都有。"
) * 3 + "最后，我们回家了"
TEXTS = [
    "hello world",
    "Hello. World!",
    "你好，世界",
    EN_LONG,
    ZH_LONG,
    "The quick brown fox jumps over the lazy dog. " * 30,
    (
        'He said "stop." Then he left! In 2005 there were 1234567 people; '
        "3.5 percent left: 42."
    ),
    (
        "CosyVoice 2 是一个 TTS 模型, 它支持 zero-shot 语音克隆。面积是 5m² 或 "
        "3m³（约）【注】`code` —— 很好 - 真的,,"
    ),
    "一、二、三、四、五、六、七、八、九、十、" * 10,
    "...!!!",
    'Hi!!"x.',
    "Numbers: 0, 007, 1000001, 99999999999999999999999999999999999.",
    "Line one.\nLine two.\n第三行。\n第四行",
    "This is a very long sentence without a full stop, with commas, " * 8 + "end",
    "Short. " + "A much longer sentence follows here to make segments. " * 6 + "End.",
    "Mixed 中英文 text. 这是第二句。And the third one!",
]


def random_texts(n: int, seed: int = 1) -> list[str]:
    """Random mixes of the characters the frontend treats specially."""
    pool = list('你好世界天气。，！？；：、.,!?;: "”abcXYZ0123456789（）【】—-²³\n')
    pool += ["hello", "我们", " world", "1999"]
    rng = random.Random(seed)
    return [
        "".join(rng.choice(pool) for _ in range(rng.randrange(1, 300)))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory) -> Path:
    return make_release_dir(tmp_path_factory.mktemp("cv2") / "CosyVoice2-tiny")


@pytest.fixture(scope="module")
def encode(release_dir):
    from vllm.model_executor.models.cosyvoice2 import get_cosyvoice2_tokenizer

    tok = get_cosyvoice2_tokenizer(str(release_dir / "CosyVoice-BlankEN"))
    return lambda text, **kwargs: tok.encode(text)


@pytest.fixture(scope="module")
def count(encode):
    return lambda text: len(encode(text))


@pytest.fixture(params=["none", "wetext"])
def tn_models(request, monkeypatch):
    """The original's normalisers: identity (neither ttsfrd nor wetext
    installed; ours told that wetext is missing) or wetext's, as its
    ``wetext`` frontend builds them."""
    if request.param == "none":
        monkeypatch.setattr(fe, "wetext_normalizers", lambda: None)
        return None
    from wetext import Normalizer

    return Normalizer(remove_erhua=False), Normalizer()


@pytest.fixture
def orig_normalize(encode, tn_models):
    """The original ``CosyVoiceFrontEnd.text_normalize`` on a stand-in
    ``self`` (no ttsfrd: ``tn_models`` normalisers, inflect, our
    tokenizer)."""
    inflect = pytest.importorskip("inflect")
    # cosyvoice.cli.frontend imports whisper (for its feature extractor only)
    stub = "whisper" not in sys.modules
    if stub:
        try:
            import whisper  # noqa: F401

            stub = False
        except ImportError:
            sys.modules["whisper"] = types.ModuleType("whisper")
    try:
        from cosyvoice.cli.frontend import CosyVoiceFrontEnd
    finally:
        if stub:
            sys.modules.pop("whisper", None)

    class Identity:
        def normalize(self, text):
            return text

    zh_tn, en_tn = tn_models or (Identity(), Identity())
    self_ = types.SimpleNamespace(
        use_ttsfrd=False,
        zh_tn_model=zh_tn,
        en_tn_model=en_tn,
        inflect_parser=inflect.engine(),
        tokenizer=types.SimpleNamespace(encode=encode),
        allowed_special="all",
    )

    def run(text, split=True):
        return CosyVoiceFrontEnd.text_normalize(self_, text, split=split)

    return run


# ------------------------------------------------------- vs the original ----
@pytest.mark.parametrize("lang", ["zh", "en"])
@pytest.mark.parametrize(
    "limits", [(80, 60, 20, False), (30, 10, 5, False), (80, 60, 20, True)]
)
def test_split_paragraph_matches_original(encode, count, lang, limits):
    max_n, min_n, merge, comma = limits
    texts = TEXTS + random_texts(300, seed=2)
    for text in texts:
        try:
            want = orig.split_paragraph(text, encode, lang, max_n, min_n, merge, comma)
        except IndexError:
            # the original's quote handling pops from an empty list when a
            # closing quote follows a leading mark: we keep the quote
            continue
        got = fe.split_paragraph(text, count, lang, max_n, min_n, merge, comma)
        assert got == want, text


def test_long_texts_split(count):
    en = fe.text_normalize(EN_LONG, count)
    zh = fe.text_normalize(ZH_LONG, count)
    assert len(en) >= 3 and len(zh) >= 3
    # nothing lost; zh gets the closing mark, lengths: tokens (en), chars (zh)
    assert "".join(en) == EN_LONG and "".join(zh) == ZH_LONG + "。"
    assert all(count(seg) > 60 for seg in en[:-1])
    assert all(len(seg) > 60 for seg in zh[:-1])


def test_text_normalize_matches_original(orig_normalize, tn_models, count):
    raised = 0
    texts = TEXTS + random_texts(2000)
    if tn_models is not None:  # what wetext normalises
        texts += [
            "今天是2024年3月5日，气温-3.5℃，花了¥120。",
            "It costs $20 on Jan 5th, 2024 at 3:30pm. I have 2.5 kg of rice.",
        ]
    for text in texts:
        try:
            want = orig_normalize(text)
        except (IndexError, AssertionError):
            # IndexError: see test_split_paragraph_matches_original;
            # AssertionError: wetext's token parser on a few odd inputs
            raised += 1
            assert fe.text_normalize(text, count) is not None
            continue
        assert fe.text_normalize(text, count) == want, text
        assert fe.normalize_text(text) == orig_normalize(text, split=False), text
    assert raised < len(texts) // 10
    if tn_models is not None:
        assert "二零二四年三月五日" in fe.normalize_text(texts[-2])
        assert "twenty dollars" in fe.normalize_text(texts[-1])


def test_helpers_match_original():
    inflect = pytest.importorskip("inflect")
    parser = inflect.engine()
    rng = random.Random(0)
    numbers = [str(i) for i in range(2100)] + ["007", "0000", "00012"]
    numbers += [str(rng.randrange(10 ** rng.randrange(1, 37))) for _ in range(3000)]
    for n in numbers:
        assert fe.number_to_words(n) == parser.number_to_words(n), n
    for text in TEXTS + random_texts(500, seed=3) + ["x²", "٣ and ١٢"]:
        assert fe.spell_out_number(text) == orig.spell_out_number(text, parser)
        assert fe.contains_chinese(text) == orig.contains_chinese(text)
        assert fe.replace_corner_mark(text) == orig.replace_corner_mark(text)
        assert fe.remove_bracket(text) == orig.remove_bracket(text)
        stripped = text.strip()
        if stripped:
            assert fe.replace_blank(stripped) == orig.replace_blank(stripped)
    # every code point of the BMP, alone and in pairs with a letter
    for cp in range(0x10000):
        c = chr(cp)
        if 0xD800 <= cp < 0xE000:
            continue
        assert fe.is_only_punctuation(c) == orig.is_only_punctuation(c), hex(cp)
        assert fe.is_only_punctuation(c + "a") == orig.is_only_punctuation(c + "a")
    # past decillions inflect raises; read digit by digit
    assert fe.number_to_words("1" * 37) == " ".join(["one"] * 37)


def test_frontend_skips_and_options(count, monkeypatch):
    # the light clean-up (no wetext); with wetext at the end
    monkeypatch.setattr(fe, "wetext_normalizers", lambda: None)
    special = "You are a helpful assistant.<|endofprompt|>Read 2 lines. Then stop."
    assert fe.text_normalize(special, count) == [special]
    assert fe.split_request_text(special, count) == [special]
    text = "Take 2 steps. " * 12
    assert len(fe.split_request_text(text, count)) > 1
    one = fe.split_request_text(text, count, {"split_text": False})
    assert one == [fe.spell_out_number(text.strip())]
    assert fe.split_request_text(text, count, {"text_frontend": False}) == [text]
    assert fe.split_request_text("?!…", count) == []
    with pytest.raises(ValueError, match="split_text"):
        fe.split_request_text(text, count, {"split_text": "no"})
    assert fe.normalize_prompt_text("take 2") == "take two"
    assert fe.normalize_prompt_text("take 2", {"text_frontend": False}) == "take 2"
    assert fe.normalize_prompt_text("面积 5m²。") == "面积5m平方。"
    monkeypatch.undo()
    assert fe.wetext_normalizers() is not None  # in the test requirements
    assert fe.normalize_prompt_text("面积 5m²。") == "面积五平方米。"
    assert fe.normalize_prompt_text("take 2.5 kg") == "take two point five kilograms"


# ------------------------------------------------------------ end to end ----
@pytest.fixture(scope="module")
def tts(release_dir):
    from vllm.entrypoints.text_to_speech.offline import SpeechSynthesizer

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield SpeechSynthesizer(
            str(release_dir),
            dtype="float32",
            enforce_eager=True,
            max_model_len=1024,
            max_num_seqs=8,
            kv_cache_memory_bytes=64 << 20,
            decode_device="cpu",
        )
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def _segments(tts, text, **extra):
    from vllm.config.text_to_speech import TextToSpeechParams

    params = TextToSpeechParams(text=text, model_config=tts.model_config, extra=extra)
    return tts.model_cls.split_speech_text(params)


def _speak_each(tts, texts, speaker, max_new_tokens, **sampling):
    """Each text as its own LM request, through the model hooks as given
    (``synthesize`` would strip the leading space of an English segment,
    which the original keeps), decoded in one batch as ``synthesize`` does."""
    from vllm.config.text_to_speech import TextToSpeechParams

    cls, mc = tts.model_cls, tts.model_config
    params = [
        TextToSpeechParams(text=t, model_config=mc, speaker=speaker) for t in texts
    ]
    kwargs = {**tts.config.default_sampling, **sampling, "max_tokens": max_new_tokens}
    prompts = [cls.get_speech_generation_prompt(p) for p in params]
    sps = [cls.get_speech_sampling_params(p, dict(kwargs)) for p in params]
    outs = tts.llm.generate(prompts, sps, use_tqdm=False)
    frames = [cls.get_speech_frames(o.outputs[0], mc) for o in outs]
    audio = tts.decoder.decode(frames, [p.voice for p in params])
    return frames, [np.asarray(a, np.float32) for a in audio]


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 7}]
)
def test_long_text_equals_segments(tts, sampling):
    """A long text is one LM run per segment with the same voice: frames and
    audio equal synthesizing the segments one by one and concatenating."""
    en, zh = _segments(tts, EN_LONG), _segments(tts, ZH_LONG)
    assert len(en) >= 3 and len(zh) >= 3
    assert en[1].startswith(" ")  # kept, as the original does
    long_en, long_zh = tts.synthesize(
        [EN_LONG, ZH_LONG], speaker="spk_a", max_new_tokens=24, **sampling
    )
    frames, audio = _speak_each(tts, en + zh, "spk_a", 24, **sampling)
    assert long_en.segments == en and long_zh.segments == zh
    for out, sl in ((long_en, slice(0, len(en))), (long_zh, slice(len(en), None))):
        assert all(0 < len(f) <= 24 for f in frames[sl])
        np.testing.assert_array_equal(out.frames, np.concatenate(frames[sl]))
        np.testing.assert_array_equal(out.audio, np.concatenate(audio[sl]))
        assert out.audio.size > 0
    # the zh segments have no leading space: synthesize() on them agrees
    parts = tts.synthesize(
        zh,
        speaker="spk_a",
        max_new_tokens=24,
        extra_args={"text_frontend": False},
        **sampling,
    )
    np.testing.assert_array_equal(
        long_zh.frames, np.concatenate([p.frames for p in parts])
    )


def test_length_rules_per_segment(tts):
    """min/max tokens come from each segment's text (2x to 20x its tokens)
    and max_new_tokens caps each segment, not the whole text."""
    from vllm.config.text_to_speech import TextToSpeechParams

    mc = tts.model_config
    segs = _segments(tts, EN_LONG)
    sp = [
        tts.model_cls.get_speech_sampling_params(
            TextToSpeechParams(text=s, model_config=mc), {"max_tokens": 1024}
        )
        for s in segs
    ]
    n_text = [len(tts.model_cls._text_ids(mc, s)) for s in segs]
    assert [p.min_tokens for p in sp] == [2 * n for n in n_text]
    assert [p.max_tokens for p in sp] == [min(20 * n, 1024) for n in n_text]
    out = tts.synthesize(EN_LONG, temperature=0.0, max_new_tokens=8)[0]
    assert len(out.frames) == 8 * len(segs)


def test_options_and_prompt_text(tts):
    from vllm.config.text_to_speech import TextToSpeechParams, VoicePrompt

    text = "Take 2 steps. " * 12
    assert len(_segments(tts, text)) > 1
    assert _segments(tts, text, split_text=False) == [fe.spell_out_number(text.strip())]
    assert _segments(tts, text, text_frontend=False) == [text]
    one = tts.synthesize(text, extra_args={"split_text": False}, max_new_tokens=4)[0]
    assert len(one.segments) == 1 and len(one.frames) == 4
    with pytest.raises(ValueError, match="nothing to speak"):
        tts.synthesize("?!")
    with pytest.raises(ValueError, match="text_frontend"):
        tts.synthesize(text, extra_args={"text_frontend": 0})
    # the zero-shot prompt text is normalised as the original's
    # inference_zero_shot does (not split)
    mc = tts.model_config
    codes = np.array([1, 2, 3])

    def prompt(ref_text, **extra):
        voice = VoicePrompt(ref_text=ref_text, codes=codes)
        params = TextToSpeechParams(
            text="hello.", model_config=mc, voice=voice, extra=extra
        )
        return tts.model_cls.get_speech_generation_prompt(params)["prompt_token_ids"]

    assert (
        prompt("take 2") == prompt("take two") != prompt("take 2", text_frontend=False)
    )
