"""Swarm token strength (peer/tokens.py): weak user-chosen tokens are refused with advice,
generated ones pass."""
from __future__ import annotations

import secrets

import pytest

from peer.tokens import MIN_TOKEN_BITS, check_token_strength, new_token, token_bits


@pytest.mark.parametrize("token", [
    "", "swarm-token", "password", "correct horse battery staple", "Tr0ub4dor&3" * 6,
    "password" * 40,                     # long but a repeat: every slice is weak
    secrets.token_hex(8),                # 64 random bits
    secrets.token_hex(16),               # 128 random bits, but zxcvbn scores hex at ~105: refused
    "qwertyuiopasdfghjklzxcvbnm1234567890",
])
def test_weak_tokens_are_refused_with_advice(token):
    with pytest.raises(ValueError, match="coordinator token.*token_urlsafe"):
        check_token_strength(token)


@pytest.mark.parametrize("token", [
    new_token(), secrets.token_urlsafe(32), secrets.token_hex(24),
    "swarm-token-a0bbdc35dfe2275ca82eb06a84e6b56c0f37c5ba",   # the test suites' tokens
    "password" * 20 + secrets.token_urlsafe(40),               # a strong slice after a weak one
    secrets.token_urlsafe(3000),                               # longer than what is scored
])
def test_strong_tokens_pass(token):
    check_token_strength(token)
    assert token_bits(token) >= MIN_TOKEN_BITS


def test_non_string_is_a_type_error():
    with pytest.raises(TypeError, match="must be a string"):
        check_token_strength(b"x" * 64)  # type: ignore[arg-type]
    assert len(new_token()) == 43 and new_token() != new_token()
