"""``python operators ...``: run the MRAnnotator MONAI Deploy app; errors end with a message and an exit code.

Exit codes: 0 success, 2 bad input (e.g. no MR series: refused before the SDK and the models load), 3 weights
problem, 4 results written but not delivered to the configured DICOM node, 1 anything else. Every run ends with
its audit record (mrannotator_audit.json in the output folder when the run wrote results; $MRANNOTATOR_AUDIT_DIR
always, refused runs included).
"""

import sys

from input_check import input_path, selected

from mrannotator.audit import RunAudit
from mrannotator.dicom.store import DeliveryError
from mrannotator.errors import MRAnnotatorError


def main() -> int:
    audit, output_dir, code, error = RunAudit(tool="map"), None, 0, None
    try:
        folder = input_path(sys.argv)
        audit.record["input"] = {"path": str(folder)}
        selected(folder)  # the CLI's input checks, before the SDK, torch and the models load
        from app import MRAnnotatorApp

        app = MRAnnotatorApp()
        audit = app.audit
        app.run()
        output_dir = app.output_dir
        if app.audit.delivered is False:
            raise DeliveryError(f"results written to {app.output_dir} but not delivered: "
                                f"{app.audit.record['delivery']['error']}")
    except MRAnnotatorError as e:
        code, error = e.exit_code, str(e)
    except Exception as e:  # the graph re-raises what an operator raised
        code, error = 1, f"{type(e).__name__}: {e}"
    audit.finish(code, error)
    audit.write(output_dir if audit.record["outputs"] else None)
    if error:
        print(f"mrannotator: error: {error}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
