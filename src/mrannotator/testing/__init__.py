"""Support for the tests and the benches: real DICOM series, a real MONAI Label server, Orthanc, a realm.

It lives in the package (not in ``tests/``) because ``bench/`` uses the same fixtures: both import it as
``mrannotator.testing`` with no ``sys.path`` edits. Server, Orthanc and realm helpers run the repository's
own app and scripts (``apps/mrannotator``, ``scripts/orthanc.py``), so they need a source checkout; nothing
in the engine imports this package.
"""
