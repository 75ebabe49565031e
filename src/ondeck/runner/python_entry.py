"""Runs a Python automation's ``main(**params)`` and writes its return value as outputs.

Executed as a separate interpreter (``python -I python_entry.py SCRIPT``); it
imports nothing from ondeck, so the script sees a clean interpreter.
"""

import asyncio
import inspect
import json
import os
import runpy
import sys


def _call() -> None:
    namespace = runpy.run_path(sys.argv[1], run_name="__ondeck__")
    function = namespace["main"]
    with open(os.environ["ONDECK_PARAMS"], encoding="utf-8") as handle:
        params = json.load(handle)
    signature = inspect.signature(function)
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        params = {k: v for k, v in params.items() if k in signature.parameters}
    result = function(**params)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    if result is None:
        return
    outputs = result if isinstance(result, dict) else {"result": result}
    with open(os.environ["ONDECK_OUTPUTS"], "w", encoding="utf-8") as handle:
        json.dump(outputs, handle, default=str)


if __name__ == "__main__":
    _call()
