"""Driven by test_ngrok_clients.py under the official ``ngrok`` package from PyPI (Python >= 3.12).

argv[1] is a JSON object: ``addr`` plus keyword options for ``ngrok.forward``.  Prints one JSON
line, ``{"url": ...}`` or ``{"error": <exception type>, "args": [...]}``; then, once stdin is
closed, disconnects the listener (an Unbind) and prints ``{"closed": true}``.
"""

import json
import sys

import ngrok


def main() -> int:
    options = json.loads(sys.argv[1])
    addr = options.pop("addr")
    try:
        listener = ngrok.forward(addr, **options)
    except Exception as exc:  # noqa: BLE001 - reported to the test as data
        print(json.dumps({"error": type(exc).__name__, "args": [str(a) for a in exc.args]}), flush=True)
        return 3
    print(json.dumps({"url": listener.url(), "id": listener.id()}), flush=True)
    sys.stdin.read()
    ngrok.disconnect(listener.url())
    print(json.dumps({"closed": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
