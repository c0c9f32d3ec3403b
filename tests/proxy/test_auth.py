"""The tokens file and the role/scope rules of proxy/access/auth.py, without a server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from proxy.access.auth import ADMIN_TOKEN_NAME, Token, TokenFileError, load_tokens
from proxy.config import Config, ConfigError
from proxy.routes import collection_id

DIGEST = hashlib.sha256(b"s3cret-token-value").hexdigest()


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    return path


def test_a_tokens_file_is_read_with_the_admin_token_added(tmp_path: Path) -> None:
    path = _file(tmp_path, f'[tokens.app]\nsha256 = "{DIGEST.upper()}"\nrole = "write"\n'
                           'scopes = ["acme/*", "globex/prod"]\n')  # fmt: skip
    tokens = load_tokens(path, admin_token="a-long-admin-token-value")
    app = tokens[DIGEST]
    assert (app.name, app.role, app.scopes) == ("app", "write", (("acme", "*"), ("globex", "prod")))
    admin = tokens[hashlib.sha256(b"a-long-admin-token-value").hexdigest()]
    assert (admin.name, admin.role) == (ADMIN_TOKEN_NAME, "admin")


@pytest.mark.parametrize(
    "text",
    [
        "not toml [",
        "[other]\nx = 1\n",
        '[tokens.a]\nsha256 = "abc"\nrole = "read"\nscopes = ["t/d"]\n',
        f'[tokens.a]\nsha256 = "{DIGEST}"\nrole = "root"\nscopes = ["t/d"]\n',
        f'[tokens.a]\nsha256 = "{DIGEST}"\nrole = "read"\nscopes = []\n',
        f'[tokens.a]\nsha256 = "{DIGEST}"\nrole = "read"\nscopes = ["just-a-tenant"]\n',
        f'[tokens.a]\nsha256 = "{DIGEST}"\nrole = "read"\nscopes = ["t/d"]\nextra = 1\n',
        f'[tokens.a]\nsha256 = "{DIGEST}"\nrole = "read"\nscopes = ["t/d"]\n'
        f'[tokens.b]\nsha256 = "{DIGEST}"\nrole = "admin"\nscopes = ["*/*"]\n',
        f'[tokens.a]\nsha256 = "{DIGEST}"\nrole = "admin"\nscopes = ["t/*"]\n',
    ],
)
def test_a_bad_tokens_file_is_refused_with_the_reason(tmp_path: Path, text: str) -> None:
    with pytest.raises(TokenFileError, match=r"tokens\.toml"):
        load_tokens(_file(tmp_path, text))


def test_scopes() -> None:
    token = Token("t", "read", (("acme", "*"), ("globex", "prod")))
    assert token.covers("acme", "anything") and token.covers("globex", "prod")
    assert not token.covers("globex", "dev") and not token.covers("initech", "prod")
    assert token.holds_tenant("acme") and not token.holds_tenant("globex")
    assert token.touches("globex") and not token.touches("initech")
    assert token.identity() == {"user_id": "t", "tenant": "acme", "databases": []}


CID = "0a3b1d50-8b80-424b-b18f-6b489ea72fd7"


@pytest.mark.parametrize(
    "sent",
    [CID, CID.upper(), CID.replace("-", ""), "{" + CID + "}", "urn:uuid:" + CID],
)
def test_every_spelling_of_a_collection_id_the_primary_takes_is_one_id(sent: str) -> None:
    # Chroma's record paths take all of these (Rust's uuid parser) for the same collection:
    # each must be checked against that collection's tenant, not only the hyphenated one.
    assert collection_id(sent) == CID


@pytest.mark.parametrize("sent", ["docs", CID + " ", CID[:-1], "urn:uuid:" + CID[1:], CID + "0"])
def test_what_cannot_be_a_collection_id_is_none(sent: str) -> None:
    assert collection_id(sent) is None


def test_listening_beyond_loopback_needs_tokens_or_a_waiver() -> None:
    with pytest.raises(ConfigError, match="tokens_file"):
        Config(listen="0.0.0.0:8000")
    Config(listen="0.0.0.0:8000", allow_unauthenticated=True)
    Config(listen="0.0.0.0:8000", tokens_file="/etc/tokens.toml")
    Config(listen="[::1]:8000")
    Config(listen="localhost:8000")
