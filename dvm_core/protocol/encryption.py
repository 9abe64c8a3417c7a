"""Which NIP-90 encryption a customer used, and answering in the same one. Pure: no I/O.

NIP-90 names NIP-04; modern clients use NIP-44 v2. A NIP-04 payload always contains `?iv=`, a
character NIP-44's base64 never has, so the scheme is read off the ciphertext itself.
"""

from __future__ import annotations

from typing import Callable, Literal

from . import nip04
from . import nip44

Scheme = Literal["nip44", "nip04"]


class DecryptionError(ValueError):
    """Content that could not be decrypted with the DVM's key."""


def detect_scheme(payload: str) -> Scheme:
    return "nip04" if nip04.looks_like_nip04(payload) else "nip44"


def decrypt(private_key: str, peer_public_key: str, payload: str) -> tuple[str, Scheme]:
    """Decrypt `payload` from `peer_public_key`; returns the plaintext and the scheme used."""
    scheme = detect_scheme(payload)
    try:
        if scheme == "nip04":
            return nip04.decrypt_from(private_key, peer_public_key, payload), scheme
        return nip44.decrypt_from(private_key, peer_public_key, payload), scheme
    except (nip04.Nip04Error, nip44.Nip44Error) as exc:
        raise DecryptionError(f"could not decrypt the content ({scheme}): {exc}") from None


def encrypt(scheme: Scheme, private_key: str, peer_public_key: str, plaintext: str) -> str:
    if scheme == "nip04":
        return nip04.encrypt_to(private_key, peer_public_key, plaintext)
    return nip44.encrypt_to(private_key, peer_public_key, plaintext)


def encrypter(scheme: Scheme, private_key: str, peer_public_key: str) -> Callable[[str], str]:
    return lambda text: encrypt(scheme, private_key, peer_public_key, text)
