"""How a session token is named outside the worker: a hash, never the token itself.

Shared by the worker (which reports sessions to the pool) and the pool (which stores and
compares them), so both compute it the same way."""
import hashlib


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]
