"""Compatibility hook, loaded at interpreter start by ``mrannotator-pydicom-compat.pth``.

MONAI Label 0.8.5 imports ``pydicom_seg`` 0.4.1, which imports ``pydicom._storage_sopclass_uids``:
a private module removed in pydicom 3 (MONAILabel issue #1841). highdicom and dicomweb-client need
pydicom 3, so instead of pinning pydicom 2 we serve that old module name from ``pydicom.uid`` (where
pydicom 3 keeps the same SOP class UID constants). The hook is lazy: nothing is imported until
somebody imports the old name, and it does nothing if pydicom ever ships that module again.
"""

import importlib.abc
import importlib.util
import sys

_OLD = "pydicom._storage_sopclass_uids"


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        import pydicom.uid as uid

        module.__dict__.update({k: v for k, v in vars(uid).items() if not k.startswith("__")})


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _OLD:
            return None
        for finder in sys.meta_path:  # a real module wins
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return importlib.util.spec_from_loader(fullname, _Loader())


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())
