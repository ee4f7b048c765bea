"""API keys of the server (cbpo_orch/serving/keys.py): the key file, 401/403/allowed, and
that no message ever shows a key."""

from __future__ import annotations

import json

import pytest

from cbpo_orch.serving.keys import KeyFileError, load_api_keys

OPERATOR = "op-key-0123456789abcdef"
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef"


def _bearer(key: str) -> str:
    return f"Bearer {key}"


@pytest.fixture(params=["json", "toml"])
def keys(request, tmp_path):
    if request.param == "json":
        path = tmp_path / "keys.json"
        path.write_text(json.dumps({OPERATOR: "*", ALICE: ["alice"], BOB: ["bob", "carol"]}))
    else:
        path = tmp_path / "keys.toml"
        path.write_text(f'"{OPERATOR}" = "*"\n"{ALICE}" = ["alice"]\n"{BOB}" = ["bob", "carol"]\n')
    return load_api_keys(path)


def test_a_key_may_use_its_users_and_the_base_model_only(keys):
    assert keys.access(_bearer(ALICE), "alice").allowed
    assert keys.access(_bearer(ALICE), None).allowed  # the base model
    assert keys.access(_bearer(ALICE), "bob").status == 403
    assert keys.access(_bearer(BOB), "carol").allowed
    assert keys.access(_bearer(BOB), "alice").status == 403
    assert all(keys.access(_bearer(OPERATOR), user).allowed for user in ("alice", "bob", "carol", "anyone", None))


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", f"Basic {ALICE}", "Bearer not-a-known-key-000000", ALICE])
def test_no_known_bearer_key_is_401(keys, header):
    for user in ("alice", None):
        decision = keys.access(header, user)
        assert decision.status == 401 and not decision.allowed
        assert "Authorization: Bearer" in decision.message
    assert keys.visible(header, ["alice", "bob"]) is None


def test_the_scheme_is_case_insensitive_and_spaces_around_the_key_do_not_count(keys):
    assert keys.access(f"bearer  {ALICE} ", "alice").allowed


def test_visible_lists_only_what_the_key_may_use_in_order(keys):
    users = ["carol", "alice", "bob", "dave"]
    assert keys.visible(_bearer(ALICE), users) == ["alice"]
    assert keys.visible(_bearer(BOB), users) == ["carol", "bob"]
    assert keys.visible(_bearer(OPERATOR), users) == users


def test_only_digests_are_kept(keys):
    kept = repr(keys.grants)
    assert all(key not in kept for key in (OPERATOR, ALICE, BOB))


BAD_FILES = {
    "missing": (None, "cannot read"),
    "not json": ('{"' + ALICE + '": ["alice"],', "not valid JSON (line 1"),
    "not toml": (f'"{ALICE}" = ["alice"\n', "not valid TOML (at "),
    "empty json": ("{}", "holds no keys"),
    "a list": (json.dumps([ALICE]), "must map each API key"),
    "short key": (json.dumps({"short": ["alice"]}), "at least 16 characters"),
    "key with spaces": (json.dumps({f" {ALICE}": ["alice"]}), "without surrounding spaces"),
    "users not a list": (json.dumps({ALICE: "alice"}), "key #1: its value must be a non-empty list"),
    "empty users": (json.dumps({OPERATOR: "*", ALICE: []}), "key #2"),
    "non-string user": (json.dumps({ALICE: ["alice", 7]}), "key #1"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_key_file_is_one_clear_error_that_shows_no_key(case, tmp_path):
    text, hint = BAD_FILES[case]
    path = tmp_path / ("keys.toml" if "toml" in case else "keys.json")
    if text is not None:
        path.write_text(text)
    with pytest.raises(KeyFileError) as raised:
        load_api_keys(path)
    message = str(raised.value)
    assert hint in message and str(path) in message
    assert ALICE not in message and OPERATOR not in message and "short" not in message.replace("short key", "")
