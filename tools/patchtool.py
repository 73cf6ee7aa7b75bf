#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Create or refresh a patch of the series from edits made in the staged tree.

Workflow: `python setup.py prepare`, edit upstream files in
build/vllm-0.26.0/ (overlay files are symlinks: edit those in the repo), then

    python tools/patchtool.py refresh 0005-foo.patch "one-line purpose" vllm/a.py ...

writes patches/0005-foo.patch as the diff of those files between
"pristine + the patches before it in the series" and the staged tree, and
adds it to patches/series if it is new. With no files, the files the patch
already touches are used (and its subject is kept if none is given).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import setup as build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["refresh"])
    ap.add_argument("name")
    ap.add_argument("subject", nargs="?", default=None)
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    if a.subject and ("/" in a.subject or a.subject.endswith(".py")) and \
            (build.ROOT / "build" / f"vllm-{build.VLLM_VERSION}" / a.subject).exists():
        a.files.insert(0, a.subject)
        a.subject = None
    series_file = ROOT / "patches" / "series"
    names = [ln.strip() for ln in series_file.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    path = ROOT / "patches" / a.name
    files = list(a.files) or (build.patched_files(path) if path.exists() else [])
    if not files:
        sys.exit("no files given")
    subject = a.subject
    if subject is None and path.exists():
        subject = path.read_text().splitlines()[0].removeprefix("Subject: ")
    if not subject:
        sys.exit("a one-line purpose is required for a new patch")
    before = names[: names.index(a.name)] if a.name in names else names
    after = names[names.index(a.name) + 1:] if a.name in names else []
    pristine = build.pristine_tree()
    tree = ROOT / "build" / f"vllm-{build.VLLM_VERSION}"
    with tempfile.TemporaryDirectory() as tmp:
        base, new = Path(tmp) / "a", Path(tmp) / "b"
        need = set(files)
        for n in before:
            need.update(build.patched_files(ROOT / "patches" / n))
        for rel in need:
            if (pristine / rel).exists():
                (base / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(pristine / rel, base / rel)
        base.mkdir(exist_ok=True)
        for n in before:
            build.git_apply(base, ROOT / "patches" / n)
        for rel in files:
            (new / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree / rel, new / rel)
        # Later patches of the series that touch the same files are taken
        # back out of the staged copy (reverse order), so that this patch
        # holds only its own hunks.
        for later in reversed(after):
            lp = ROOT / "patches" / later
            shared = set(build.patched_files(lp)) & set(files)
            for rel in sorted(shared):
                r = subprocess.run(
                    ["git", "apply", "-R", f"--include={rel}", str(lp)],
                    cwd=new, capture_output=True, text=True,
                    env={"GIT_CEILING_DIRECTORIES": tmp, "PATH": "/usr/bin:/bin"})
                if r.returncode != 0:
                    sys.exit(f"cannot take {later} back out of {rel}: {r.stderr}"
                             "\n(its hunks overlap this patch's; merge them)")
        diffs = []
        for rel in files:
            r = subprocess.run(
                ["git", "diff", "--no-index", "--no-color", f"a/{rel}", f"b/{rel}"],
                cwd=tmp, capture_output=True, text=True)
            if r.returncode not in (0, 1):
                sys.exit(r.stderr)
            d = r.stdout.replace(f"a/a/{rel}", f"a/{rel}").replace(f"b/b/{rel}", f"b/{rel}")
            if d:
                diffs.append(d)
    if not diffs:
        sys.exit("no changes in the given files")
    previous = path.read_text() if path.exists() else None
    path.write_text(f"Subject: {subject}\n\n" + "".join(diffs))
    if a.name not in names:
        with open(series_file, "a") as f:
            f.write(a.name + "\n")
    # The whole series must still apply exactly to the pristine sdist.
    r = subprocess.run([sys.executable, str(ROOT / "setup.py"), "check-patches"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        if previous is None:
            path.unlink()
            series_file.write_text("".join(n + "\n" for n in names))
        else:
            path.write_text(previous)
        sys.exit("series no longer applies; patch not changed:\n" + r.stdout + r.stderr)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
