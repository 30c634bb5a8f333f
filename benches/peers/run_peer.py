#!/usr/bin/env python3
"""Runs a peer script (ort_moe.py / ov_moe.py) with the temporary folders it makes
(its ONNX files: 3.2 GB for Full) redirected into TMP, removed when it exits.

    python run_peer.py TMP SCRIPT [ARGS...]
"""
import os
import runpy
import shutil
import sys
import tempfile


def main():
    tmp, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(tmp, exist_ok=True)
    orig = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix=None, dir=None):  # noqa: A002 - tempfile's own signature
        return orig(suffix, prefix, tmp)

    tempfile.mkdtemp = mkdtemp
    sys.argv = [script] + args
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
