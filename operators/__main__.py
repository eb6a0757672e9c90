"""``python operators ...``: run the MRAnnotator MONAI Deploy app; errors end with a message and an exit code.

Exit codes: 0 success, 2 bad input (e.g. no MR series), 3 weights problem, 1 anything else.
"""

import sys

from app import MRAnnotatorApp

from mrannotator.errors import MRAnnotatorError

if __name__ == "__main__":
    try:
        MRAnnotatorApp().run()
    except MRAnnotatorError as e:
        print(f"mrannotator: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:  # the graph re-raises what an operator raised
        print(f"mrannotator: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
