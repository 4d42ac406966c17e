"""Role names: what a linear does in a transformer block, the vocabulary every compression method, PET
method and architecture map selects layers by."""

from __future__ import annotations

from cpet.errors import CpetError

ATTN_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("ffn_in", "ffn_out")
ALL_ROLES = ATTN_ROLES + FFN_ROLES
EMBED_ROLE = "embed"  # the token embedding: a compression target (int8), never a PET target


def check_roles(roles: tuple[str, ...], what: str, allowed: tuple[str, ...] = ALL_ROLES) -> None:
    """Raise unless ``roles`` is a non-empty selection of ``allowed``."""
    bad = [r for r in roles if r not in allowed]
    if bad or not roles:
        raise CpetError(f"{what}: unknown target roles {bad or '[] (empty)'}; choose from {list(allowed)}")
