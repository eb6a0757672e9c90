"""``python operators ...``: run the MRAnnotator MONAI Deploy app; errors end with a message and an exit code.

Exit codes: 0 success, 2 bad input (e.g. no MR series: refused before the SDK and the models load),
3 weights problem, 1 anything else.
"""

import sys

from input_check import input_path, selected

from mrannotator.errors import MRAnnotatorError

if __name__ == "__main__":
    try:
        selected(input_path(sys.argv))  # the CLI's input checks, before the SDK, torch and the models load
        from app import MRAnnotatorApp

        MRAnnotatorApp().run()
    except MRAnnotatorError as e:
        print(f"mrannotator: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:  # the graph re-raises what an operator raised
        print(f"mrannotator: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
