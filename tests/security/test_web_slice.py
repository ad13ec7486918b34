"""``/viewer/slice.png`` checks every input: infinities, NaN, numbers too large for a float or
for the store's 64-bit ids, negative values and garbage get 400 with what was wrong, never 500
(``pt=<slice>,0,inf`` and a huge ``review`` id raised OverflowError)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.ui.reviewed_study import ReviewedStudy, reviewed_study
from tests.ui.test_web import login
from ui.web import UiContext, create_app

GOOD = {"pos": "0", "w": "1500", "l": "-600", "ov": "1", "sel": "", "pt": "3,48,48", "lang": "en"}
BAD = [
    ("pt", "3,0,inf"),
    ("pt", "3,inf,0"),
    ("pt", "3,0,-inf"),
    ("pt", "3,nan,0"),
    ("pt", "3,1e400,0"),
    ("pt", "inf,0,0"),
    ("pt", "1e400,0,0"),
    ("pt", "99999999999999999999999999999,0,0"),
    ("pt", "-5,0,0"),
    ("pt", "3.5,0,0"),
    ("pt", "3,0"),
    ("pt", "3,0,0,0"),
    ("pt", "a,b,c"),
    ("pt", ""),
    ("review", "1" * 30),
    ("review", str(2**63)),
    ("review", "-1"),
    ("review", "0"),
    ("review", "1e3"),
    ("review", "abc"),
    ("review", "１"),  # a full-width digit, which int() would take
    ("review", ""),
    ("pos", "-1"),
    ("pos", "1" * 30),
    ("pos", "1.5"),
    ("pos", "inf"),
    ("w", "inf"),
    ("w", "-inf"),
    ("w", "nan"),
    ("w", "1e400"),
    ("w", "0"),
    ("w", "-1500"),
    ("w", "1_500"),
    ("w", "0x10"),
    ("l", "nan"),
    ("l", "1e400"),
    ("l", "-1e400"),
    ("l", "garbage"),
    ("ov", "2"),
    ("ov", "yes"),
    ("sel", "<script>"),
    ("sel", "a" * 65),
]


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, ReviewedStudy]]:
    study = reviewed_study(tmp_path_factory.mktemp("slice"))
    _, gate = create_app(UiContext(study.config, study.store, study.accounts, study.reviews))
    client = TestClient(gate, base_url="http://127.0.0.1", raise_server_exceptions=False)
    login(client, "rad")
    study.reviews.open(study.review_id(), study.radiologist)  # the audited view
    yield client, study


def query(study: ReviewedStudy, **changed: str) -> dict[str, str]:
    return {"review": str(study.review_id()), **GOOD, **changed}


def test_a_valid_request_is_served(web: tuple[TestClient, ReviewedStudy]) -> None:
    client, study = web
    response = client.get("/viewer/slice.png", params=query(study))
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
    far = client.get("/viewer/slice.png", params=query(study, pos=str(2**31 - 1), pt="-1,0,0"))
    assert far.status_code == 200  # past the end: the last slice, as before
    unknown = client.get("/viewer/slice.png", params=query(study, review=str(2**63 - 1)))
    assert unknown.status_code == 404  # the largest id the store can hold: just not there


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_input_is_400_with_a_reason(
    web: tuple[TestClient, ReviewedStudy], name: str, value: str
) -> None:
    client, study = web
    response = client.get("/viewer/slice.png", params=query(study, **{name: value}))
    assert response.status_code == 400, (name, value, response.status_code, response.text)
    assert response.text.startswith(name), response.text  # names what was wrong
    assert len(response.text) < 300


@pytest.mark.parametrize("missing", ["review", "pos", "w", "l"])
def test_a_missing_parameter_is_400(web: tuple[TestClient, ReviewedStudy], missing: str) -> None:
    client, study = web
    params = query(study)
    del params[missing]
    response = client.get("/viewer/slice.png", params=params)
    assert response.status_code == 400 and f"{missing} is missing" in response.text
