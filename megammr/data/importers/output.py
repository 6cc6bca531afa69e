"""Where an import writes: checks before it starts, the staging directory, moving the result
into place (images first, the JSONL last), and removing what a killed import left behind.

OUT_images/ holds a marker file (MARKER) naming its JSONL, so `--overwrite` only ever replaces
the images folder of an earlier import, never a folder that merely has the same name.
"""
from __future__ import annotations

import os
import shutil

from megammr.data.importers.base import ImportFailure

MARKER = ".megammr-import"


def check_paths(out: str, images_dir: str, inputs: list, images_root, overwrite: bool):
    if os.path.isdir(out):
        raise ImportFailure(f"--out {out} is a directory; give the JSONL file to write")
    if os.path.exists(out) and not overwrite:
        raise ImportFailure(f"{out} exists (pass --overwrite to replace it and its {os.path.basename(images_dir)}/)")
    if os.path.exists(images_dir) and not os.path.isfile(os.path.join(images_dir, MARKER)):
        raise ImportFailure(f"{images_dir} exists and is not the images folder of a megammr import; move it away "
                            "or choose another --out")
    for p in list(inputs) + ([images_root] if images_root else []):
        ap = os.path.abspath(p)
        if ap == out or ap == images_dir or ap.startswith(images_dir + os.sep):
            raise ImportFailure(f"{p} is part of the output ({out}, {images_dir}/), which the import replaces")


def write_file(path: str, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def move_into_place(stage: str, out: str, images_dir: str, rejected: str):
    """Images first, then the rejected rows, the JSONL last: a reader that sees the new JSONL sees its images."""
    staged_images = os.path.join(stage, "images")
    if os.path.isdir(staged_images):
        _fsync_tree(staged_images)
        old = None
        if os.path.exists(images_dir):
            old = images_dir + f".old-{os.getpid()}"
            os.replace(images_dir, old)
        os.replace(staged_images, images_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    elif os.path.exists(images_dir):
        shutil.rmtree(images_dir)  # the previous import's images (ours: checked): this one has none
    if os.path.exists(os.path.join(stage, "rejected.jsonl")):
        os.replace(os.path.join(stage, "rejected.jsonl"), rejected)
    elif os.path.exists(rejected):
        os.remove(rejected)  # the previous import's rejected rows, not this one's
    os.replace(os.path.join(stage, "records.jsonl"), out)
    shutil.rmtree(stage, ignore_errors=True)


def _fsync_tree(root: str):
    for d, _, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
