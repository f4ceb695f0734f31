"""affinity_key: headers, then session/user fields, then the prompt prefix."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmfleet.errors import ConfigError
from lmfleet.routing import affinity_key


def test_header_wins_and_is_case_insensitive() -> None:
    body = {"session_id": 7, "messages": [{"role": "user", "content": "hi"}]}
    assert affinity_key({"X-Session-Id": " abc "}, body) == "abc"
    assert affinity_key({"x-session-id": "abc", "x-lmfleet-affinity": "pin"}, body) == "pin"


def test_empty_header_is_ignored() -> None:
    assert affinity_key({"x-session-id": ""}, {"user": "u1"}) == "user:u1"


def test_session_id_then_user() -> None:
    assert affinity_key({}, {"session_id": 42, "user": "u1"}) == "session:42"
    assert affinity_key({}, {"session_id": -1, "user": "u1"}) == "user:u1"  # LMDeploy's "none"
    assert affinity_key({}, {"session_id": True, "user": "u1"}) == "user:u1"


def test_chat_prefix_is_system_plus_first_user_message() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Question one"},
            {"role": "assistant", "content": "Answer"},
            {"role": "user", "content": "Question two"},
        ]
    }
    assert affinity_key({}, body) == "You are terse.\nQuestion one"
    # Later turns do not change the key: the conversation stays on its node.
    assert affinity_key({}, {"messages": body["messages"][:2]}) == affinity_key({}, body)


def test_multimodal_content_keeps_text_parts() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                    {"type": "text", "text": "Describe"},
                    {"type": "text", "text": "briefly"},
                ],
            }
        ]
    }
    assert affinity_key({}, body) == "Describe\nbriefly"


def test_prefix_is_truncated() -> None:
    body = {
        "messages": [{"role": "system", "content": "s" * 300}, {"role": "user", "content": "q"}]
    }
    assert affinity_key({}, body, prefix_chars=256) == "s" * 256
    assert affinity_key({}, {"prompt": "abcdef"}, prefix_chars=3) == "abc"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"prompt": "Once upon"}, "Once upon"),  # /v1/completions and /generate
        ({"prompt": ["first", "second"]}, "first"),
        ({"prompt": [1, 2, 3]}, "tokens:1,2,3"),
        ({"prompt": [[4, 5], [6]]}, "tokens:4,5"),
        ({"input_ids": [7, 8]}, "tokens:7,8"),  # LMDeploy /generate with token ids
        ({"prompt": ""}, None),
        ({"prompt": []}, None),
        ({"messages": []}, None),
        ({"messages": [{"role": "user", "content": None}]}, None),
        ({}, None),
    ],
)
def test_completion_and_generate_bodies(body: dict[str, Any], expected: str | None) -> None:
    assert affinity_key({}, body) == expected


def test_no_body() -> None:
    assert affinity_key({}, None) is None


def test_bad_prefix_chars() -> None:
    with pytest.raises(ConfigError):
        affinity_key({}, {"prompt": "x"}, prefix_chars=0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.dictionaries(
        st.sampled_from(["messages", "prompt", "input_ids", "session_id", "user", "model"]),
        json_values,
    ),
    st.integers(1, 64),
)
def test_any_json_body_gives_a_short_string_or_none(body: dict[str, Any], limit: int) -> None:
    key = affinity_key({}, body, prefix_chars=limit)
    assert key is None or (isinstance(key, str) and key)
