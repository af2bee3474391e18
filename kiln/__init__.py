"""kiln: build and serve large language models.

The card's top-level folders are this namespace's subpackages: ``runtime/`` is
``kiln.runtime``, ``parallel/`` is ``kiln.parallel``, ``kernels/`` is
``kiln.kernels`` and ``launch/`` is ``kiln.launch``.
"""

__version__ = "0.1.0"
