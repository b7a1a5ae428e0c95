"""Partner generators: produce the second modality (NBI) from the first (white light)."""

from mics.nbi.base import GENERATORS, PartnerGenerator, get_generator, register_generator
from mics.nbi.virtual import VirtualNBI

__all__ = ["GENERATORS", "PartnerGenerator", "VirtualNBI", "get_generator", "register_generator"]
