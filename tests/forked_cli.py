"""mlplab command lines, each in a fresh process forked from one that has paid the imports once.

A child runs the console script's own ``main()`` with its ``sys.argv``, as the installed script does, so the
tests can try many command lines through the real parser without ~4 s of imports each. Protocol: one JSON request
per line on stdin (``tool``, ``args``, ``cwd``, ``output``; optionally ``errors``, a file of its own for stderr,
``env``, variables to set (null: unset), ``path``, folders to import from first, and ``seconds`` before it is
stopped), one JSON answer (``returncode``) per line on stdout. A request ``{"together": [request, ...]}`` runs its
command lines side by side, as separate processes, and answers with their ``returncodes`` once all have ended.
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


def run_child(request: dict) -> None:
    os.chdir(request["cwd"])
    sys.path[:0] = request.get("path", [])  # as PYTHONPATH would put them
    for name, value in request.get("env", {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    out = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    errors = os.open(request["errors"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if request.get("errors") else out
    os.dup2(out, 1)
    os.dup2(errors, 2)
    signal.alarm(request.get("seconds", CHILD_SECONDS))  # a hang ends the child with SIGALRM, which the test reports
    tool = request.get("tool", "mlplab-train")
    sys.argv = [tool, *request["args"]]
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


def started(request: dict) -> int:
    child = os.fork()
    if child == 0:
        run_child(request)
    return child


def ended(child: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if "together" in request:
            children = [started(one) for one in request["together"]]
            print(json.dumps({"returncodes": [ended(child) for child in children]}), flush=True)
        else:
            print(json.dumps({"returncode": ended(started(request))}), flush=True)


if __name__ == "__main__":
    serve()
