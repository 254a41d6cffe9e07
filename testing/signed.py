"""Raw signed coordinator requests for tests and benches (peer/reqsign.py over aiohttp), below
the product's CoordinatorClient: tests need to send exactly the bytes they choose (replays,
altered paths, hostile bodies), which a well-behaved client never would."""
from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp

from peer import admission, reqsign
from peer.identity import Identity


@dataclass
class Answer:
    status: int
    raw: bytes
    headers: dict

    @property
    def json(self) -> dict:
        try:
            doc = json.loads(self.raw or b"{}")
        except ValueError:
            return {"raw": self.raw[:200].decode("latin-1")}
        return doc if isinstance(doc, dict) else {"value": doc}

    @property
    def code(self) -> str | None:
        return self.json.get("error")


def encode_body(body: dict | bytes | str | None) -> bytes:
    if body is None:
        return b""
    if isinstance(body, dict):
        return json.dumps(body).encode()
    return body.encode() if isinstance(body, str) else bytes(body)


class Signer:
    """One identity talking to one coordinator over one aiohttp session.
    ``ssl``: what aiohttp's ``ssl=`` takes (e.g. ``aiohttp.Fingerprint(pin)``)."""

    def __init__(self, url: str, identity: Identity | None = None, *, ssl: object = None,
                 timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.identity = identity or Identity.generate()
        self.ssl = ssl
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> "Signer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def headers(self, method: str, path: str, body: bytes, *, with_key: bool = False) -> dict:
        return reqsign.sign_headers(self.identity, method, path, body, with_key=with_key)

    async def send(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                   content_type: str | None = "application/json") -> Answer:
        """Send exactly ``body`` with exactly ``headers`` (nothing signed here)."""
        headers = dict(headers or {})
        if content_type and body:
            headers.setdefault("Content-Type", content_type)
        async with self._session.request(method, self.url + path, data=body or None,
                                         headers=headers, ssl=self.ssl) as r:
            return Answer(r.status, await r.read(), dict(r.headers))

    async def request(self, method: str, path: str, body: dict | bytes | str | None = None, *,
                      content_type: str | None = "application/json") -> Answer:
        """Sign and send one request."""
        data = encode_body(body)
        return await self.send(method, path, data,
                               self.headers(method, path, data,
                                            with_key=path == admission.ADMIT_PATH),
                               content_type)

    async def admit(self, body: dict | admission.AdmitRequest | None = None) -> Answer:
        if isinstance(body, admission.AdmitRequest):
            body = body.to_json()
        return await self.request("POST", admission.ADMIT_PATH, body or {})

    async def admit_invite(self, invite_id: str, secret: bytes) -> Answer:
        proof = admission.invite_proof(secret, self.identity.public_bytes)
        return await self.admit(admission.AdmitRequest(invite=invite_id, proof=proof))

    async def admit_token(self, token: str) -> Answer:
        proof = admission.token_proof(token, self.identity.public_bytes)
        return await self.admit(admission.AdmitRequest(token_proof=proof))

    async def join(self, address: str = "127.0.0.1:9", meta: dict | None = None) -> Answer:
        return await self.request("POST", "/api/join", {"address": address,
                                                        "meta": meta or {"roles": ["train"]}})
