"""The local demo's exposure (issue 12, item 14)."""

from __future__ import annotations


def test_demo_makes_the_ray_token_private(tmp_path):
    """Issue 12, item 14: Ray writes ~/.ray/auth_token world-readable; the demo restricts it to the user."""
    from lipnext_scale.runtime import restrict_token_file

    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    assert restrict_token_file(token) is True
    assert token.stat().st_mode & 0o777 == 0o600
    assert restrict_token_file(token) is False  # already private: left alone
    assert restrict_token_file(tmp_path / "missing") is False
