"""Hypothesis strategies shared by the test suite."""

from __future__ import annotations

from hypothesis import strategies as st

ROOM_ALPHABET = "ABCabc019_.:-"

rooms = st.text(ROOM_ALPHABET, min_size=1, max_size=64)
few_rooms = st.sampled_from(["r1", "r2", "r3"])
few_users = st.sampled_from(["ann", "bob", "cy"])
usernames = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs")), min_size=1, max_size=64)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
durations = st.floats(min_value=0.01, max_value=100, allow_nan=False)

#: Client messages the broker refuses, with the ``error`` code each gets.
bad_requests = st.sampled_from(
    [
        ("not json", "bad_json"),
        ('{"type": "chat", "content": NaN}', "bad_json"),
        ("[1, 2]", "bad_message"),
        ('{"type": "dance"}', "bad_message"),
        ('{"type": 7}', "bad_message"),
        ('{"type": "chat"}', "bad_message"),
        ('{"type": "join"}', "bad_message"),
        ('{"type": "leave", "room": "no spaces"}', "invalid_room"),
        ('{"type": "chat", "room": 5, "content": 1}', "invalid_room"),
    ]
)
