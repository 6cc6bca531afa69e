"""LLaVA-style conversations (Geometry3K- and MathV360K-derived sets, LLaVA-OneVision subsets).

Layout, from LLaVA's own description of its training data ("Finetune LLaVA on Custom Datasets",
https://github.com/haotian-liu/LLaVA/blob/main/docs/Finetune_Custom_Data.md): a JSON list of
    id             str                     a unique identifier (optional here: MathV360K's
                                           train_samples_all_tuning.json rows may lack it,
                                           https://huggingface.co/datasets/Zhiqiang007/MathV360K)
    image          str                     the image path, relative to the image folder (LLaVA's
                                           --image_folder; MathV360K: data_images/), or a list
    images         list[str]               several images (multi-image variants)
    conversations  [{from, value}]         from: "human" | "gpt" (also "system"); the human value
                                           carries one `<image>` per image
JSONL copies and Hugging Face parquet conversions (image as an `Image` feature, {bytes, path};
conversations as a list of structs) read the same way; `role`/`content` turns
(user/assistant) are accepted too. Other plain-JSON keys (e.g. `source`, `data_source`) are kept.

Record: the one human turn is the question (placeholders out), the one gpt turn gives the answer
(its final answer: last \\boxed{}, <answer> tag or "The answer is ..."; normalise.final_answer) and
is kept whole under extra["response"] when that differs. RL needs one question and one answer:
a conversation with more than one exchange is `bad_conversation` (counted with --skip-invalid).
"""
from __future__ import annotations

from megammr.data.importers.base import Context, Importer, as_object, image_list, plain_extra, record_id
from megammr.data.schema import RawRow, RecordError

_HUMAN, _GPT, _SYSTEM = ("human", "user"), ("gpt", "assistant"), ("system",)
_OWN = ("id", "image", "images", "conversations", "conversation", "source")


class LLaVA(Importer):
    name = "llava"
    card = "https://github.com/haotian-liu/LLaVA/blob/main/docs/Finetune_Custom_Data.md"
    required_columns = ("conversations",)
    images_hint = "the image folder the paths are relative to (LLaVA's --image_folder; MathV360K: data_images/)"

    def check_file(self, ctx: Context):
        if ctx.columns is not None and "conversations" not in ctx.columns and "conversation" in ctx.columns:
            return
        super().check_file(ctx)

    def convert(self, row: RawRow, ctx: Context) -> dict:
        d = as_object(row)
        err = lambda fld, reason, msg: RecordError(row.path, row.line, fld, reason, msg)  # noqa: E731
        key = "conversations" if "conversations" in d else "conversation"
        conv = d.get(key)
        if conv is None:
            raise err("conversations", "missing_field", "no conversations: a LLaVA row is {id, image, conversations: "
                      "[{from: human, value}, {from: gpt, value}]}")
        if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
            raise err(key, "wrong_type", "expected a list of {from, value} turns")
        turns = []
        for i, t in enumerate(conv):
            who, text = t.get("from", t.get("role")), t.get("value", t.get("content"))
            if not isinstance(who, str) or not isinstance(text, str):
                raise err(f"{key}[{i}]", "bad_conversation", "a turn needs a `from` and a string `value`")
            who = who.strip().lower()
            if who not in _HUMAN + _GPT + _SYSTEM:
                raise err(f"{key}[{i}].from", "bad_conversation",
                          f"unknown speaker {who!r} (expected human, gpt or system)")
            turns.append((who, text))
        if turns and turns[0][0] in _SYSTEM:
            turns = turns[1:]
        if len(turns) != 2 or turns[0][0] not in _HUMAN or turns[1][0] not in _GPT:
            shape = " -> ".join(w for w, _ in turns) or "nothing"
            raise err(key, "bad_conversation", f"expected one human turn then one gpt turn, got {shape}; "
                      "a record is one "
                      "question with one answer (split multi-turn conversations before importing)")
        question, response = turns[0][1], turns[1][1]
        if not response.strip():
            raise err(f"{key}[1].value", "empty_field", "the gpt turn (the answer) is empty")
        refs = d.get("images") if d.get("images") is not None else d.get("image")
        images = image_list(row, refs, "images" if d.get("images") is not None else "image")
        extra = plain_extra(d, _OWN)
        extra["response"] = response
        source = d.get("source")
        if source is not None and not isinstance(source, str):
            raise err("source", "wrong_type", f"expected str, got {type(source).__name__}")
        return {"id": record_id(row, ctx, d.get("id")), "question": question, "answer": response,
                "answer_is_response": True, "images": images, "source": source or ctx.source, "extra": extra}
