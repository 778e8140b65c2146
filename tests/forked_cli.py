"""mlplab command lines, each in a fresh process forked from one that has paid the imports once.

A child runs the console script's own ``main()`` with its ``sys.argv``, as the installed script does, so the
tests can try many command lines through the real parser without ~4 s of imports each. Protocol: one JSON request
per line on stdin (``tool``, ``args``, ``cwd``, ``output``), one JSON answer (``returncode``) per line on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import torch

import mlplab.cli.evaluate
import mlplab.cli.predict
import mlplab.cli.report
import mlplab.cli.train

TOOLS = {
    "mlplab-train": mlplab.cli.train.main,
    "mlplab-eval": mlplab.cli.evaluate.main,
    "mlplab-predict": mlplab.cli.predict.main,
    "mlplab-report": mlplab.cli.report.main,
}

# The first optimizer a process builds imports torch._dynamo (~1.5 s); every run pays it once, so the parent does.
torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])

CHILD_SECONDS = 120


def run_child(tool: str, args: list[str], cwd: str, output: str) -> None:
    os.chdir(cwd)
    out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    signal.alarm(CHILD_SECONDS)  # a hang ends the child with SIGALRM, which the test reports
    sys.argv = [tool, *args]
    code = 0
    try:
        TOOLS[tool]()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # what the interpreter would print for the real script
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        child = os.fork()
        if child == 0:
            run_child(request.get("tool", "mlplab-train"), request["args"], request["cwd"], request["output"])
        _, status = os.waitpid(child, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
