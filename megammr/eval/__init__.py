"""Evaluation on MathVista, MathVerse, MathVision and OlympiadBench (local files only).

    samples = load_benchmark("mathvista", "data/mathvista/testmini.json")
    summary = evaluate(engine, samples, "mathvista", out_dir="outputs/eval/mathvista")
"""
from megammr.eval.readers import PAPER, READERS, EvalDataError, EvalSample, load_benchmark
from megammr.eval.runner import evaluate, format_table

__all__ = ["PAPER", "READERS", "EvalDataError", "EvalSample", "load_benchmark", "evaluate", "format_table"]
