"""Snakemake command lines for the tests (dry runs, runs, --unlock, --lint), each in its own forked process, with
Snakemake imported only once.

Importing Snakemake and its plugins (pandas, SQLAlchemy, ...) takes about 3 s of the 4 s a dry run of the tiny
workflow costs, and the tests run about a hundred dry runs. This server imports Snakemake once; for every request
(one JSON line on stdin: argv, cwd, env, extra sys.path) it forks a child that runs ``snakemake.cli.main(argv)``
exactly as ``python -m snakemake`` would, with its stdout and stderr in files, and answers with the exit status.
The superposition package is never imported here (only third-party modules it uses), only in the children (by
the Snakefile), so a child can be pointed at a modified copy of it. Requests are served one at a time; the tests start one server per thread.
"""

from __future__ import annotations

import json
import os
import sys


def _child(request: dict) -> None:
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for path in reversed(request.get("sys_path", [])):
        sys.path.insert(0, path)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.argv = ["snakemake", *request["argv"]]
    code = 1
    try:
        from snakemake.cli import main

        main(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import snakemake.cli  # noqa: F401  (the import every child then shares)
    import snakemake.scheduling.job_scheduler  # noqa: F401  (imports the executor plugins)
    # third-party modules the workflow's planning code imports (never superposition itself)
    import h5py  # noqa: F401
    import jsonschema  # noqa: F401
    import numpy  # noqa: F401
    import yaml  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
