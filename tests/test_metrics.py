"""Official metrics on hand-computed inputs."""

import pytest

from cpet.tasks.metrics import normalize_answer, squad_exact_match, squad_f1, squad_scores


@pytest.mark.parametrize("raw,norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple, a pear ", "apple pear"),
    ("Theater", "theater"),  # 'the' only as a whole word
    ("U.S.A.", "usa"),
    ("A-1", "a1"),  # punctuation removed before articles: 'a1' is not the article 'a'
])
def test_squad_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_squad_em_and_f1_hand_computed():
    assert squad_exact_match("the Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert squad_exact_match("Denver", ["Denver Broncos"]) == 0.0
    # pred 'denver broncos won' vs gold 'broncos': P = 1/3, R = 1 -> F1 = 0.5;
    # vs gold 'denver broncos': P = 2/3, R = 1 -> F1 = 0.8 (the max over golds counts)
    assert squad_f1("Denver Broncos won", ["Broncos", "Denver Broncos"]) == pytest.approx(0.8)
    assert squad_f1("Carolina", ["Denver Broncos"]) == 0.0
    scores = squad_scores(["Denver Broncos", "Carolina Panthers"], [["Denver Broncos"], ["Panthers"]])
    assert scores["exact_match"] == 0.5 and scores["f1"] == pytest.approx((1.0 + 2 / 3) / 2)
