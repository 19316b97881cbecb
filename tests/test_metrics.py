"""String metrics on known strings: SQuAD exact match and F1, numbers by value, ROUGE-L."""

from __future__ import annotations

import pytest

from legokit.metrics import exact_match, first_number, normalize_answer, number_match, rouge_l, token_f1


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match("the Paris.", ["Lyon", "paris"]) == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert token_f1("Paris France", "Paris") == pytest.approx(2 / 3)
    assert token_f1("Paris France", ["Lyon", "France Paris"]) == 1.0  # best gold, bag of tokens
    assert token_f1("", "Paris") == 0.0 and token_f1("Lyon", "Paris") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing


def test_numbers_compare_by_value():
    assert number_match("There are 9 apples.", "9") == 1.0
    assert number_match("0.5", "1/2") == 1.0 and number_match("1,200 people", "1200") == 1.0
    assert number_match("nine", "9") == 1.0 and number_match("-3", "-3") == 1.0
    assert number_match("10", "9") == 0.0 and number_match("none", "9") == 0.0
    assert first_number("seven and 3") == 7 and first_number("3 and seven") == 3
    assert first_number("no digits") is None


def test_rouge_l_uses_the_longest_common_subsequence():
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)  # order matters, unlike token F1
    assert rouge_l("A b, C!", "a b c") == 1.0
    p, r = 2 / 2, 2 / 4
    assert rouge_l("x y", "x q y q") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("", "a") == 0.0 and rouge_l("a", "b") == 0.0
