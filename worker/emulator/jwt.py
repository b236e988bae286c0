"""JWT active tokens for the emulator: ES256, signed with the key ``/v2/client/jwks`` serves.

RFC 7515 compact serialization, written out (three base64url parts, the signature as raw ``r||s``)
because the emulator needs nothing else from a JWT library. The worker never verifies them: it
treats every active token as an opaque secret and asks Pangea, as the guide does.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from worker.emulator import store


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One EC P-256 key: its JWKS (public half, shaped like Pangea's) and :meth:`sign`."""

    kid: str
    private: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key with a Pangea-shaped key id."""
        return cls(kid=store.new_id("pvi_") + "|1", private=ec.generate_private_key(ec.SECP256R1()))

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """``/v2/client/jwks``'s result: this key's public half."""
        numbers = self.private.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kid": self.kid,
                    "kty": "EC",
                    "alg": "ES256",
                    "crv": "P-256",
                    "use": "sig",
                    "x": _b64(numbers.x.to_bytes(32, "big")),
                    "y": _b64(numbers.y.to_bytes(32, "big")),
                }
            ]
        }

    def sign(self, claims: dict[str, object]) -> str:
        """The compact JWT of ``claims``."""
        header = _b64(orjson.dumps({"alg": "ES256", "typ": "JWT", "kid": self.kid}))
        payload = _b64(orjson.dumps(claims))
        signing_input = f"{header}.{payload}".encode("ascii")
        r, s = decode_dss_signature(self.private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return f"{header}.{payload}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
