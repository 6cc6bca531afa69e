"""Small, deterministic, verifiable data for all three phases (nothing is downloaded).

Phase 1: text arithmetic and word problems. Phases 2 and 3: images rendered with PIL (bar
charts, counting shapes, reading numbers, simple geometry) with a question whose answer follows
from the picture; phase 2 records carry a caption that states what the picture shows, phase 3
records do not. About a third of the records are multiple choice. Every answer is an integer
or a choice letter, so math-verify and the choice reward can check it.

The same seed gives byte-identical files (Python's `random.Random` and PIL's PNG encoder are
deterministic); the phases draw from different seeds so no record repeats across phases.
"""
from __future__ import annotations

import io
import json
import os
import random
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

from megammr.data.shards import build_shards

SIZE = 224
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60), "orange": (240, 140, 20),
          "purple": (140, 60, 180)}
IMAGE_KINDS = ("bar_chart", "counting", "reading", "geometry")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _choices(rng: random.Random, answer: int, k: int = 4) -> tuple[list[str], str]:
    """k distinct numeric options containing the answer; returns (choices, letter)."""
    opts = {answer}
    while len(opts) < k:
        o = answer + rng.choice([-1, 1]) * rng.randint(1, max(3, abs(answer) // 2 + 1))
        if o >= 0 or answer < 0:  # no negative distractor for a non-negative answer
            opts.add(o)
    opts = sorted(opts)
    return [str(o) for o in opts], "ABCDEFGH"[opts.index(answer)]


# --------------------------------------------------------------------------- phase 1 (text)
def text_problem(rng: random.Random) -> dict:
    kind = rng.choice(["arith", "arith", "apples", "speed", "price"])
    if kind == "arith":
        a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 12)
        op = rng.choice(["+", "-"])
        q = f"Compute {a} {op} {b} * {c}."
        ans = a + b * c if op == "+" else a - b * c
    elif kind == "apples":
        a, b, c = rng.randint(3, 20), rng.randint(2, 6), rng.randint(2, 9)
        q = (f"Mia has {a} apples. She buys {b} bags with {c} apples in each bag, then gives away "
             f"{min(a, 3)} apples. How many apples does she have now?")
        ans = a + b * c - min(a, 3)
    elif kind == "speed":
        v, t = rng.randint(20, 90), rng.randint(2, 7)
        q = f"A train travels at {v} km per hour for {t} hours. How many kilometres does it travel?"
        ans = v * t
    else:
        p, n, paid = rng.randint(2, 15), rng.randint(2, 8), 0
        paid = (p * n // 50 + 1) * 50
        q = f"A notebook costs {p} dollars. Tom buys {n} notebooks and pays with {paid} dollars. How much change does he get?"
        ans = paid - p * n
    rec = {"question": q, "answer": str(ans), "source": f"synthetic/{kind}"}
    if rng.random() < 0.3:
        rec["choices"], rec["answer"] = _choices(rng, ans)
    return rec


# --------------------------------------------------------------------------- phases 2/3 (images)
def bar_chart(rng: random.Random):
    n = rng.randint(3, 5)
    labels = "ABCDE"[:n]
    values = [rng.randint(1, 9) for _ in range(n)]
    img = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(img)
    f = _font(12)
    x0, y0, top = 30, SIZE - 24, 20
    unit = (y0 - top) / 10
    for t in range(0, 11, 2):  # y axis with ticks every 2
        y = y0 - t * unit
        d.line([(x0 - 4, y), (SIZE - 10, y)], fill=(225, 225, 225))
        d.text((6, y - 7), str(t), fill="black", font=f)
    d.line([(x0, top), (x0, y0), (SIZE - 10, y0)], fill="black", width=2)
    w = (SIZE - 10 - x0) / n
    color = rng.choice(list(COLORS.values()))
    for i, (lab, v) in enumerate(zip(labels, values)):
        xa = x0 + i * w + w * 0.2
        d.rectangle([xa, y0 - v * unit, xa + w * 0.6, y0], fill=color)
        d.text((xa + w * 0.22, y0 + 4), lab, fill="black", font=f)
    caption = "A bar chart with " + ", ".join(f"bar {lab} at {v}" for lab, v in zip(labels, values)) + "."
    form = rng.choice(["value", "sum", "diff", "max"])
    choices = None
    if form == "value":
        i = rng.randrange(n)
        q, a = f"What is the value of bar {labels[i]} in the bar chart?", str(values[i])
    elif form == "sum":
        q, a = "What is the sum of the values of all bars in the chart?", str(sum(values))
    elif form == "diff":
        q, a = "What is the difference between the tallest and the shortest bar?", str(max(values) - min(values))
    else:
        if values.count(max(values)) > 1:  # a tie has no single answer: draw another chart
            return bar_chart(rng)
        q, choices = "Which bar is the tallest?", [f"bar {lab}" for lab in labels]
        a = "ABCDE"[values.index(max(values))]
    return img, q, a, caption, choices


def counting(rng: random.Random):
    img = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(img)
    cells = [(r, c) for r in range(4) for c in range(4)]
    rng.shuffle(cells)
    kinds = rng.sample(["circle", "square", "triangle"], rng.randint(1, 3))
    names = rng.sample(list(COLORS), len(kinds))
    counts = {}
    for k, cname in zip(kinds, names):
        counts[k] = (cname, rng.randint(1, 5))
    cell = SIZE // 4
    for k, (cname, cnt) in counts.items():
        for _ in range(cnt):
            r, c = cells.pop()
            cx, cy, s = c * cell + cell // 2, r * cell + cell // 2, rng.randint(12, 20)
            box = [cx - s, cy - s, cx + s, cy + s]
            if k == "circle":
                d.ellipse(box, fill=COLORS[cname])
            elif k == "square":
                d.rectangle(box, fill=COLORS[cname])
            else:
                d.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=COLORS[cname])
    parts = [f"{cnt} {cname} {k}{'s' if cnt > 1 else ''}" for k, (cname, cnt) in counts.items()]
    caption = "The image shows " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."
    if len(kinds) > 1 and rng.random() < 0.5:
        q, a = "How many shapes are there in the image in total?", sum(c for _, c in counts.values())
    else:
        k = rng.choice(kinds)
        q, a = f"How many {k}s are there in the image?", counts[k][1]
    choices = None
    if rng.random() < 0.3:
        choices, letter = _choices(rng, a)
        return img, q, letter, caption, choices
    return img, q, str(a), caption, choices


def reading(rng: random.Random):
    num = rng.randint(10, 9999)
    img = Image.new("RGB", (SIZE, SIZE), (245, 245, 235))
    d = ImageDraw.Draw(img)
    f = _font(48)
    d.text((SIZE // 2, SIZE // 2), str(num), fill=(20, 20, 20), font=f, anchor="mm")
    caption = f"The image shows the number {num}."
    k = rng.randint(2, 30)
    form = rng.choice(["plus", "times", "digits"])
    if form == "plus":
        q, a = f"What is the number shown in the image plus {k}?", num + k
    elif form == "times":
        k = rng.randint(2, 9)
        q, a = f"What is the number shown in the image multiplied by {k}?", num * k
    else:
        q, a = "What is the sum of the digits of the number shown in the image?", sum(map(int, str(num)))
    return img, q, str(a), caption, None


def geometry(rng: random.Random):
    img = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(img)
    f = _font(16)
    form = rng.choice(["rect_area", "rect_perimeter", "hypotenuse"])
    if form == "hypotenuse":
        m = rng.randint(1, 3)
        a, b, c = [m * x for x in rng.choice([(3, 4, 5), (5, 12, 13), (8, 15, 17)])]
        p0, p1, p2 = (40, 180), (40, 40), (190, 180)
        d.polygon([p0, p1, p2], outline="black", width=3)
        d.rectangle([40, 166, 54, 180], outline="black")
        d.text((14, 104), str(a), fill="black", font=f)
        d.text((108, 186), str(b), fill="black", font=f)
        caption = f"A right triangle whose legs have lengths {a} and {b}."
        q, ans = "The triangle in the image has a right angle. What is the length of its hypotenuse?", c
    else:
        w, h = rng.randint(2, 15), rng.randint(2, 15)
        d.rectangle([40, 50, 180, 160], outline="black", width=3)
        d.text((104, 28), str(w), fill="black", font=f)
        d.text((188, 96), str(h), fill="black", font=f)
        caption = f"A rectangle with width {w} and height {h}."
        if form == "rect_area":
            q, ans = "What is the area of the rectangle in the image?", w * h
        else:
            q, ans = "What is the perimeter of the rectangle in the image?", 2 * (w + h)
    if rng.random() < 0.4:
        choices, letter = _choices(rng, ans)
        return img, q, letter, caption, choices
    return img, q, str(ans), caption, None


_MAKERS = {"bar_chart": bar_chart, "counting": counting, "reading": reading, "geometry": geometry}


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_phase(out_dir: str, phase: int, n: int, seed: int = 0) -> str:
    """Write out_dir/phase{phase}.jsonl (+ images/phase{phase}/*.png); return the JSONL path."""
    rng = random.Random(seed * 1000 + phase)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"phase{phase}.jsonl")
    img_dir = os.path.join(out_dir, "images", f"phase{phase}")
    if phase != 1:
        os.makedirs(img_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rid = f"synthetic-p{phase}-{i:06d}"
            if phase == 1:
                rec = {"id": rid, **text_problem(rng)}
            else:
                kind = IMAGE_KINDS[i % len(IMAGE_KINDS)]
                img, q, a, caption, choices = _MAKERS[kind](rng)
                name = f"{i:06d}.png"
                with open(os.path.join(img_dir, name), "wb") as g:
                    g.write(png_bytes(img))
                rec = {"id": rid, "question": q, "answer": a, "images": [f"images/phase{phase}/{name}"],
                       "source": f"synthetic/{kind}"}
                if phase == 2:
                    rec["caption"] = caption
                if choices:
                    rec["choices"] = choices
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    return path


def write_all(out: str, n: int = 256, seed: int = 0, phases=(1, 2, 3), build: bool = True,
              progress: bool = True, overwrite: bool = True) -> dict[int, dict[str, Optional[str]]]:
    """JSONL under out/raw and, with build, shards under out/phase{1,2,3} (the tiny recipes' paths)."""
    result = {}
    for p in phases:
        jsonl = write_phase(os.path.join(out, "raw"), p, n, seed)
        shards = None
        if build:
            shards = os.path.join(out, f"phase{p}")
            build_shards([jsonl], p, shards, overwrite=overwrite, progress=progress)
        result[p] = {"jsonl": jsonl, "shards": shards}
    return result
