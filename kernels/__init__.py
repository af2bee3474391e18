"""kiln.kernels: one module per op, a plain-torch reference beside each fast GPU path.

This folder is installed as ``kiln.kernels``. When the project root is on ``sys.path`` (``python -m``
or ``python -c`` run from a checkout), a bare ``import kernels`` would find this folder instead of the
PyPI distribution of that name, which transformers looks for. Imported under the bare name, this
module therefore loads that distribution in its place; where none is installed it empties itself
into what a stray namespace folder looks like (no ``__file__``, no ``__version__``, nothing to
import from it), which is how transformers recognizes a name that only shadows a package.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        def _shadow(mod):
            keep = {"__name__", "__spec__", "__loader__", "__package__", "__builtins__"}
            for k in [k for k in vars(mod) if k not in keep]:
                delattr(mod, k)
            mod.__file__ = None
            mod.__path__ = []

        _shadow(sys.modules["kernels"])
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
