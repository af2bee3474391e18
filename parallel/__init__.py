"""kiln.parallel: the rank mapping, partition specs, parallel layers and collectives."""

from kiln.parallel.mapping import Mapping

__all__ = ["Mapping"]
