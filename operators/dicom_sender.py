"""C-STORE of the run's DICOM results (SEG + SR) to the node configured in the MAP's environment.

Only in the graph when a destination is configured (MRANNOTATOR_DICOM_DEST or MRANNOTATOR_DICOM_AE/_HOST/_PORT;
see ``mrannotator.dicom.store``). A failed delivery does not stop the graph: the files stay in the output
folder, the audit record gets the outcome, and the app exits with code 4 (``python operators``).
"""

from __future__ import annotations

import logging

from monai.deploy.core import Fragment, Operator, OperatorSpec

from mrannotator.audit import RunAudit
from mrannotator.dicom.store import Destination, send


class DICOMSenderOperator(Operator):
    """dicom_files (paths) -> C-STORE to ``destination``, with retries; the outcome goes to the audit record."""

    def __init__(self, fragment: Fragment, *args, destination: Destination, retries: int, delay: float,
                 audit: RunAudit, **kwargs):
        self.destination, self.retries, self.delay, self.audit = destination, retries, delay, audit
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("dicom_files")

    def compute(self, op_input, op_output, context):
        files = op_input.receive("dicom_files")
        log = logging.getLogger(__name__)
        d = self.destination
        log.info(f"C-STORE {len(files)} files to {d.ae_title}@{d.host}:{d.port} as {d.calling_ae}")
        outcome = send(files, d, retries=self.retries, delay=self.delay)
        self.audit.delivery(d.as_dict(), outcome)
        self.audit.timed("send", outcome["seconds"])
        if outcome["status"] == "delivered":
            log.info(f"delivered to {d.ae_title} in {outcome['seconds']} s ({len(outcome['attempts'])} attempt(s))")
        else:
            log.error(f"delivery to {d.ae_title}@{d.host}:{d.port} failed: {outcome['error']}")
