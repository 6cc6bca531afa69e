"""Rewards: format, answer extraction, every answer form, multiple choice (in-process, fast)."""
import pytest

from megammr.config import RewardConfig
from megammr.rewards import RewardItem, Weights, score_item
from megammr.rewards import extract as ex

W = Weights.from_config(RewardConfig())  # the recipe defaults: format 0.5, accuracy 1.0


def resp(answer: str, think: str = "Let me work it out.") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def acc(pred: str, gold: str, choices=None) -> float:
    return score_item(RewardItem(resp(pred), gold, choices), W).accuracy


# --------------------------------------------------------------------------- format
@pytest.mark.parametrize("text", [
    "<think>a</think><answer>1</answer>",
    "  <think>\nreasoning\n</think>\n\n<answer> 1 </answer>\n  ",
    "<think></think> <answer>x</answer>",
])
def test_format_accepts(text):
    assert ex.format_ok(text, require_think=True)


@pytest.mark.parametrize("text", [
    "<think>a</think><answer>1</answer> trailing",       # nothing after the answer
    "preamble <think>a</think><answer>1</answer>",       # nothing before the think block
    "<think>a</think> between <answer>1</answer>",        # nothing between the blocks
    "<answer>1</answer>",                                  # think block required
    "<think>a</think>",                                     # answer block required
    "<think>a</think><answer>1</answer><answer>2</answer>",  # one answer only
    "<think>a<think>b</think><answer>1</answer>",          # one think only
    "<think>a</think><answer>  </answer>",                 # empty answer
    "<answer>1</answer><think>a</think>",                  # wrong order
    "<think>a</think><answer>1",                           # truncated
    "",
])
def test_format_rejects(text):
    assert not ex.format_ok(text, require_think=True)


def test_format_think_optional():
    assert ex.format_ok("<answer>1</answer>", require_think=False)
    assert ex.format_ok("<think>a</think><answer>1</answer>", require_think=False)
    assert not ex.format_ok("x <answer>1</answer>", require_think=False)


def test_reward_parts_and_weights():
    good = score_item(RewardItem(resp("\\boxed{4}"), "4"), W)
    assert (good.format, good.accuracy, good.reward) == (1.0, 1.0, 1.5)
    bad_format = score_item(RewardItem("The answer is <answer>4</answer> ok", "4"), W)
    assert (bad_format.format, bad_format.accuracy, bad_format.reward) == (0.0, 1.0, 1.0)
    wrong = score_item(RewardItem(resp("5"), "4"), W)
    assert (wrong.format, wrong.accuracy, wrong.reward) == (1.0, 0.0, 0.5)
    w2 = Weights.from_config(RewardConfig(format_weight=0.0, accuracy_weight=2.0))
    assert score_item(RewardItem(resp("4"), "4"), w2).reward == 2.0


# --------------------------------------------------------------------------- extraction
def test_last_boxed_wins_inside_answer():
    assert ex.extract_answer(resp("\\boxed{1} no wait \\boxed{\\frac{2}{3}}"), require_tag=True) == ("\\frac{2}{3}", True)
    # a box in the think block does not count once there is an answer block
    assert ex.extract_answer("<think>\\boxed{9}</think><answer>7</answer>", require_tag=True) == ("7", False)
    assert ex.last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert ex.last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert ex.last_boxed("\\boxed{unclosed") is None
    assert ex.last_boxed("\\fbox{3}") == "3"


def test_answer_tag_required_by_default():
    assert acc_raw("<think>x</think> \\boxed{4}", "4") == 0.0
    lenient = Weights.from_config(RewardConfig(require_answer_tag=False))
    assert score_item(RewardItem("<think>x</think> so \\boxed{4}", "4"), lenient).accuracy == 1.0
    assert score_item(RewardItem("The answer is 4", "4"), lenient).accuracy == 1.0


def acc_raw(response, gold):
    return score_item(RewardItem(response, gold), W).accuracy


# --------------------------------------------------------------------------- answer forms
@pytest.mark.parametrize("gold,pred", [
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac12"), ("1/2", "\\boxed{\\dfrac{1}{2}}"), ("1.5", "3/2"),  # fractions
    ("0.25", "\\frac{1}{4}"), ("10", "10.0"), ("3.14", "3.140"), ("-2", "-2.0"),                       # decimals
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("x^2+2x+1", "(x+1)^2"), ("2\\pi", "2 \\pi"),          # LaTeX
    ("50\\%", "50"), ("25%", "0.25"), ("12.5\\%", "12.5\\%"),                                         # percentages
    ("[1,2)", "[1, 2)"), ("(0, 1]", "(0,1]"), ("(-\\infty, 3)", "(-\\infty,3)"),                      # intervals
    ("\\{1,2\\}", "\\{2,1\\}"), ("\\{1, 2, 3\\}", "\\{3,2,1\\}"),                                     # sets
    ("(1,2)", "(1, 2)"), ("(3, -1)", "(3,-1)"),                                                       # tuples
    ("5", "5 \\text{ cm}"), ("12", "12 cm^2"), ("5", "5 meters"), ("7", "7\\,\\mathrm{kg}"),          # units
    ("30", "30^\\circ"), ("30^\\circ", "30"), ("45", "45°"), ("60^{\\circ}", "60"),                   # degrees
    ("3", "x = 3"), ("2", "The answer is 2"), ("4", "\\boxed{2^2}"),                                 # misc
])
def test_equivalent_forms(gold, pred):
    assert acc(pred, gold) == 1.0, (gold, pred)


@pytest.mark.parametrize("gold,pred", [
    ("\\frac{1}{2}", "0.6"), ("1/3", "0.3"), ("50\\%", "40"), ("[1,2)", "[1,2]"), ("(1,2)", "(2,1)"),
    ("\\{1,2\\}", "\\{1,3\\}"), ("5", "6 cm"), ("5", "5x"), ("30", "60^\\circ"), ("2", "the answer is 3"),
    ("4", "\\boxed{4} no, actually \\boxed{5}"),
])
def test_non_equivalent_forms(gold, pred):
    assert acc(pred, gold) == 0.0, (gold, pred)


# --------------------------------------------------------------------------- multiple choice
CHOICES = ["3", "\\frac{1}{2}", "7 cm", "none of these"]


@pytest.mark.parametrize("gold", ["B", "(B)", "b", "\\frac{1}{2}", "1/2"])
@pytest.mark.parametrize("pred", ["B", "(B)", "B.", "B) \\frac{1}{2}", "\\frac{1}{2}", "0.5", "\\boxed{B}",
                                  "The answer is (B)", "\\text{B}"])
def test_multiple_choice_right(gold, pred):
    assert acc(pred, gold, CHOICES) == 1.0, (gold, pred)


@pytest.mark.parametrize("pred", ["A", "(C)", "C.", "3", "none of these", "A or B", "(A) (B) (C) (D)", "E"])
def test_multiple_choice_wrong(pred):
    assert acc(pred, "B", CHOICES) == 0.0, pred


def test_multiple_choice_mapping_and_prefixed_options():
    assert acc("C", "triangle", {"A": "circle", "B": "square", "C": "triangle"}) == 1.0
    # MathVista-style options stored with their letter
    assert acc("4", "B", ["(A) 2", "(B) 4", "(C) 6"]) == 1.0
    # MathVerse keeps the options inside the question: gold is a bare letter, no list
    assert acc("(D)", "D") == 1.0 and acc("D. 12", "D") == 1.0 and acc("C", "D") == 0.0


def test_text_helpers():
    assert ex.to_text(b"\xff\xfeab") == "\ufffd\ufffdab"
    assert ex.to_text("a\udcffb") == "a?b"
    assert ex.norm_text(" $\\text{Yes}$. ") == "yes"
