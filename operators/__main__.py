"""``python operators ...``: run the MRAnnotator MONAI Deploy app; errors end with a message and an exit code.

Exit codes: 0 success, 2 bad input (e.g. no MR series), 3 weights problem, 4 results written but not
delivered to the configured DICOM node, 1 anything else. Every run ends with its audit record
(mrannotator_audit.json in the output folder when the run wrote results; $MRANNOTATOR_AUDIT_DIR always).
"""

import sys

from app import MRAnnotatorApp

from mrannotator.dicom.store import DeliveryError
from mrannotator.errors import MRAnnotatorError


def main() -> int:
    app = MRAnnotatorApp()
    code, error = 0, None
    try:
        app.run()
        if app.audit.delivered is False:
            raise DeliveryError(f"results written to {app.output_dir} but not delivered: "
                                f"{app.audit.record['delivery']['error']}")
    except MRAnnotatorError as e:
        code, error = e.exit_code, str(e)
    except Exception as e:  # the graph re-raises what an operator raised
        code, error = 1, f"{type(e).__name__}: {e}"
    app.audit.finish(code, error)
    app.audit.write(app.output_dir if app.audit.record["outputs"] else None)
    if error:
        print(f"mrannotator: error: {error}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
