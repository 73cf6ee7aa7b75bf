# SPDX-License-Identifier: Apache-2.0
"""The build proves itself: the patch set applies exactly to the pinned
sdist, the installed vLLM is the patched tree, the device overlay and the
upstream diff reproduce the same files, and the patched engine generates.

Run from the repository root with the build's interpreter:
    .venv/bin/pytest tests/build
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))


def _load_build_driver():
    # Not via sys.path: the repository root holds vllm/ (overlay files only),
    # which would shadow the installed package as a namespace package.
    spec = importlib.util.spec_from_file_location("vllm_speech_build", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = _load_build_driver()

TREE = ROOT / "build" / f"vllm-{build.VLLM_VERSION}"


def run_driver(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "setup.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, **kw)


# ---------------------------------------------------------------- patch set
def test_series_is_complete_and_each_patch_states_its_purpose():
    patches = build.series()
    assert patches, "patches/series is empty"
    for p in patches:
        first = p.read_text().splitlines()[0]
        assert first.startswith("Subject: ") and len(first) > len("Subject: ") + 10, p
        assert build.patched_files(p), f"{p.name} changes no file"


def test_patch_series_applies_exactly_to_pristine_sdist():
    sdist = build.cache_dir() / build.SDIST_NAME
    assert build.sha256(sdist) == build.SDIST_SHA256
    r = run_driver("check-patches")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(build.series())} patches apply exactly" in r.stdout


def test_inexact_patch_is_rejected(tmp_path):
    """A patch whose context no longer matches must fail, never fuzz."""
    patch = build.series()[0]
    lines = patch.read_text().splitlines(keepends=True)
    # Corrupt the first context line of the first hunk.
    for i, ln in enumerate(lines):
        if ln.startswith("@@"):
            j = i + 1
            while not lines[j].startswith(" "):
                j += 1
            lines[j] = " " + lines[j][1:].rstrip("\n") + "  # drifted\n"
            break
    bad = tmp_path / patch.name
    bad.write_text("".join(lines))
    tree = tmp_path / "tree"
    for rel in build.patched_files(patch):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build.pristine_tree() / rel, tree / rel)
    with pytest.raises(SystemExit, match="does not apply"):
        build.git_apply(tree, bad)
    build.git_apply(tree, patch)  # the real one applies to the same files


def test_overlays_are_new_files_only():
    pristine = build.pristine_tree()
    overlays = build.overlay_files()
    assert "vllm/model_executor/layers/codebook_embedding.py" in overlays
    clashes = [rel for rel in overlays if (pristine / rel).exists()]
    assert not clashes, f"overlays replacing upstream files: {clashes}"
    for rel in overlays:
        if rel.endswith(".py"):
            head = (ROOT / rel).read_text().splitlines()[:1]
            assert head and head[0].startswith("# SPDX-License-Identifier"), rel


def test_overlay_and_patched_files_pass_vllm_lint():
    """vLLM's pre-commit ruff hooks (ruff-check, ruff-format) with the
    tree's own pyproject.toml, on every Python file the patch set adds or
    changes; ruff as vLLM 0.26.0 pins it (tools/requirements-test.txt)."""
    files = [rel for rel in build.overlay_files() if rel.endswith(".py")]
    for patch in build.series():
        files += [f for f in build.patched_files(patch)
                  if f.endswith(".py") and f not in files]
    assert "vllm/v1/worker/gpu_model_runner.py" in files
    ruff = [sys.executable, "-m", "ruff"]
    version = subprocess.run([*ruff, "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.split() == ["ruff", "0.14.0"], version
    for cmd in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        proc = subprocess.run([*ruff, *cmd, *files], capture_output=True,
                              text=True, cwd=TREE)
        assert proc.returncode == 0, f"ruff {cmd[0]}:\n{proc.stdout}{proc.stderr}"


# ------------------------------------------------------------- the package
def test_installed_vllm_is_the_patched_tree():
    import vllm
    from vllm import _speech_build_info as info

    assert Path(vllm.__file__).resolve().is_relative_to(TREE.resolve())
    assert info.PATCH_SET_DIGEST == build.patch_set_digest(), \
        "stale build: run `python setup.py build`"
    assert info.PATCHES == [p.name for p in build.series()]
    # Patch 0001 at work through vLLM's own precompiled path: every CPU ISA
    # variant of the kernels was extracted from the wheel.
    if "cpu" in importlib.metadata.version("vllm"):
        pkg = Path(vllm.__file__).parent
        for name in ("_C.abi3.so", "_C_AVX2.abi3.so", "_C_AVX512.abi3.so"):
            assert (pkg / name).exists(), name
    # Patch 0002: vLLM's setup.py/CMake know the speech extension.
    assert 'CMakeExtension(name="vllm._speech_C", optional=True)' in \
        (TREE / "setup.py").read_text()
    assert "include(cmake/speech_extension.cmake)" in (TREE / "CMakeLists.txt").read_text()


def test_cpu_platform_and_kernels_load():
    import torch

    from vllm.platforms import current_platform

    if not torch.cuda.is_available():
        assert current_platform.is_cpu(), current_platform
        current_platform.import_kernels()
        assert hasattr(torch.ops._C, "rms_norm"), "vLLM CPU kernels not loaded"


def test_codebook_embedding_reference():
    import torch

    from vllm.model_executor.layers.codebook_embedding import (
        codebook_embedding_sum, codebook_embedding_sum_ref)

    torch.manual_seed(0)
    k, c, h = 4, 16, 8
    w = torch.randn(k * c, h)
    codes = torch.randint(0, c, (5, k))
    expect = torch.stack([sum(w[codes[n, j] + j * c] for j in range(k))
                          for n in range(5)])
    torch.testing.assert_close(codebook_embedding_sum_ref(codes, w, c), expect)
    torch.testing.assert_close(codebook_embedding_sum(codes, w, c), expect)
    with pytest.raises(ValueError, match="exceed"):
        codebook_embedding_sum_ref(codes, w, c + 1)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        codebook_embedding_sum_ref(codes[0], w, c)


# ------------------------------------------------------ overlay and diff
def test_device_overlay_patches_a_stock_package_idempotently(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(build.pristine_tree() / "vllm", site / "vllm")
    for _ in range(2):  # re-running restores the originals first
        r = run_driver("device-overlay", "--site", str(site))
        assert r.returncode == 0, r.stdout + r.stderr
    for rel in build.overlay_files():
        if rel.startswith("vllm/"):
            assert (site / rel).read_bytes() == (ROOT / rel).read_bytes(), rel
    for p in build.series():
        for rel in build.patched_files(p):
            if rel.startswith("vllm/"):
                assert (site / rel).read_bytes() == (TREE / rel).read_bytes(), rel
    info = (site / build.BUILD_INFO).read_text()
    assert build.patch_set_digest() in info


def test_upstream_diff_is_one_applicable_diff(tmp_path):
    out = tmp_path / "speech.diff"
    r = run_driver("upstream-diff", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    for rel in build.overlay_files():
        assert f"diff --git a/{rel} b/{rel}" in text, rel
    for p in build.series():
        for rel in build.patched_files(p):
            assert f"diff --git a/{rel} b/{rel}" in text, rel
    assert "tests/build/" not in text  # project-only tests stay out
    tree = tmp_path / "v"
    shutil.copytree(build.pristine_tree(), tree, symlinks=True,
                    ignore=shutil.ignore_patterns("tests", "docs", "benchmarks",
                                                  "examples", "csrc", "rust"))
    for rel in set(build.patched_files(build.series()[0])) | {"CMakeLists.txt"}:
        shutil.copy2(build.pristine_tree() / rel, tree / rel)
    r = subprocess.run(["git", "apply", "--check", "--include=vllm/*",
                        "--include=setup.py", "--include=CMakeLists.txt",
                        "--include=cmake/*", str(out)],
                       cwd=tree, capture_output=True, text=True,
                       env={"GIT_CEILING_DIRECTORIES": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    from make_demo_checkpoint import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen2-tiny")


def test_openai_server_generates_like_transformers(demo_checkpoint):
    """`vllm.entrypoints.openai.api_server` on the demo checkpoint, called by
    the official openai client; greedy output equals HF transformers'."""
    import torch
    from demo import serve
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_checkpoint)
    prompt = "The quick brown fox"
    ids = tok(prompt, return_tensors="pt").input_ids
    hf = AutoModelForCausalLM.from_pretrained(demo_checkpoint, torch_dtype=torch.float32)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    with serve(demo_checkpoint, ["--dtype", "float32", "--max-model-len", "256",
                                 "--max-num-seqs", "4",
                                 "--kv-cache-memory-bytes", str(64 << 20)]) as base:
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY")
        res = client.completions.create(
            model=str(demo_checkpoint), prompt=prompt, max_tokens=12,
            temperature=0.0, extra_body={"ignore_eos": True,
                                         "return_token_ids": True})
        # A TTS route on a text model: a clear 400, and the engine is unharmed.
        import openai
        with pytest.raises(openai.BadRequestError,
                           match="does not support speech generation"):
            client.audio.speech.create(model=str(demo_checkpoint), voice="default",
                                       input="hello")
        again = client.completions.create(
            model=str(demo_checkpoint), prompt=prompt, max_tokens=12,
            temperature=0.0, extra_body={"ignore_eos": True})
        assert again.choices[0].text == res.choices[0].text
    choice = res.choices[0]
    got = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
    assert got == ref, (got, ref, json.dumps(res.model_dump())[:500])
