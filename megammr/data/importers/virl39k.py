"""ViRL39K (phases 2 and 3, multimodal math): `39Krelease.parquet` + `images.zip`.

Layout, from the dataset card (https://huggingface.co/datasets/TIGER-Lab/ViRL39K, section "Dataset
Keys") and the columns its users read (e.g. the preprocessing scripts that load 39Krelease.parquet
with the features question, answer, PassRate_32BTrained, PassRate_7BBase, category, source, qid,
image):
    question             str          may hold `<image>` placeholders
    answer               str          "all answers are with \\boxed{}" (card)
    image                list[str]    paths relative to the dataset root, e.g. "images/<qid>-0.jpg"
                                      (images.zip unzipped beside the parquet); bytes and {bytes,
                                      path} structs (an HF `Image` feature) are read too
    qid                  str          the question id
    category             str          one of eight categories
    source               str          the dataset it came from (LLaVA-OneVision, MM-Eureka, ...)
    PassRate_32BTrained  float        pass rate of the 32B trained model, every row
    PassRate_7BBase      float        pass rate of Qwen2.5-VL-7B, labelled on about half of the
                                      rows only (card: "partial PassRate for 7BUntrained"); -1
                                      where not labelled, as the release writes it
Any other `PassRate*` column a later release adds is kept the same way.

Record: id = qid, question (placeholders out), answer (box stripped; a choice letter when the
question ships its options), images, source `virl39k`, extra {category, origin (the row's
`source`: the schema's own `source` is the dataset), PassRate_32BTrained, PassRate_7BBase}
under their published names, values as published.
"""
from __future__ import annotations

import math

from megammr.data.importers.base import (Context, Importer, as_object, image_list, plain_extra, record_id,
                                         required)
from megammr.data.schema import RawRow, RecordError

_OWN = ("question", "answer", "image", "images", "qid", "source")


class ViRL39K(Importer):
    name = "virl39k"
    card = "https://huggingface.co/datasets/TIGER-Lab/ViRL39K"
    source = "virl39k"
    preferred = ("39Krelease.parquet",)
    extensions = (".parquet", ".jsonl")
    required_columns = ("question", "answer", "image")
    images_hint = "the folder holding images/ (unzip images.zip beside 39Krelease.parquet)"

    def convert(self, row: RawRow, ctx: Context) -> dict:
        d = as_object(row)
        question = required(row, d, "question", (str,), "question")
        answer = required(row, d, "answer", (str, int, float), "answer")
        images = image_list(row, d.get("image", d.get("images")), "image")
        if not images:
            raise RecordError(row.path, row.line, "image", "missing_field",
                              "no image: ViRL39K rows carry a list of image paths in `image`")
        extra = plain_extra(d, _OWN)
        for k, v in d.items():
            if k.startswith("PassRate"):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or
                                      (isinstance(v, float) and not math.isfinite(v))):
                    raise RecordError(row.path, row.line, k, "wrong_type",
                                      f"a pass rate must be a finite number (or null), got {v!r}")
                extra[k] = v
        origin = d.get("source")
        if origin is not None:
            if not isinstance(origin, str):
                raise RecordError(row.path, row.line, "source", "wrong_type",
                                  f"expected str, got {type(origin).__name__}")
            extra["origin"] = origin
        return {"id": record_id(row, ctx, d.get("qid")), "question": question, "answer": answer,
                "images": images, "source": ctx.source, "extra": extra}
