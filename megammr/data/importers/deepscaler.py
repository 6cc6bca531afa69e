"""DeepScaleR-Preview-Dataset (phase 1, text-only math): `deepscaler.json`, one JSON list.

Layout, from the dataset card and its file listing
(https://huggingface.co/datasets/agentica-org/DeepScaleR-Preview-Dataset, files:
https://huggingface.co/datasets/agentica-org/DeepScaleR-Preview-Dataset/tree/main): ~40.3k rows of
    problem   str   the question (LaTeX)
    answer    str   the short final answer (sometimes `\\boxed{...}`)
    solution  str   a worked solution
Hugging Face's parquet conversion of it (refs/convert/parquet) and a JSONL copy have the same
columns and read the same way. The dataset's discussions report rows without an answer
(https://huggingface.co/datasets/agentica-org/DeepScaleR-Preview-Dataset/discussions/4): those
are `missing_field` / `empty_field` errors (counted skips with --skip-invalid).

Record: id `deepscaler-<0-based row>`, question = problem, answer = normalised answer, source
`deepscaler`, extra {"solution": ...} (kept: it costs little and a warm-up can use it).
"""
from __future__ import annotations

from megammr.data.importers.base import Context, Importer, as_object, plain_extra, record_id, required
from megammr.data.schema import RawRow


class DeepScaleR(Importer):
    name = "deepscaler"
    card = "https://huggingface.co/datasets/agentica-org/DeepScaleR-Preview-Dataset"
    source = "deepscaler"
    preferred = ("deepscaler.json",)
    required_columns = ("problem", "answer")

    def convert(self, row: RawRow, ctx: Context) -> dict:
        d = as_object(row)
        problem = required(row, d, "problem", (str,), "problem (the question)")
        answer = required(row, d, "answer", (str, int, float), "answer")
        extra = plain_extra(d, ("problem", "answer", "id"))  # solution, and whatever else a copy adds
        return {"id": record_id(row, ctx, d.get("id")), "question": problem, "answer": answer,
                "source": ctx.source, "extra": extra}
