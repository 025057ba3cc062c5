"""``llmcore repo``: the model repository of a running server (index, load, unload) over HTTP.

    llmcore repo index --url http://127.0.0.1:8000
    llmcore repo load smol --url http://127.0.0.1:8000
    llmcore repo unload smol --abort --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

EPILOG = """\
examples:
  llmcore repo index --url http://127.0.0.1:8000
  llmcore repo load smol --url http://127.0.0.1:8000
  llmcore repo unload smol --abort --url http://127.0.0.1:8000

unload waits for the model's running requests to finish (drain, the default; at most the model's
request timeout) unless --abort stops them at once; either way its name answers 404 afterwards and
its KV cache and weights are freed. A failed load leaves the other models serving; the error says why.
The API key comes from --api-key or $LLMCORE_API_KEY.
"""


def add_repo_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("repo", help="list, load and unload models of a running server's repository",
                              description="List, load and unload the models of a running server's model repository "
                                          "(llmcore serve --model-repository DIR), over HTTP.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["index", "load", "unload"])
    p.add_argument("model", nargs="?", help="the model (a folder of the repository); needed by load and unload")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="Bearer key (default: $LLMCORE_API_KEY)")
    p.add_argument("--abort", action="store_true", help="unload: abort running requests instead of draining them")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the server (default 900)")
    p.set_defaults(func=repo_command)
    return p


def repo_command(args: argparse.Namespace) -> int:
    import httpx  # part of the serve extra

    if args.action != "index" and not args.model:
        print(f"llmcore repo {args.action}: error: name the model, e.g. 'llmcore repo {args.action} smol'",
              file=sys.stderr)
        return 2
    key = args.api_key or (os.environ.get("LLMCORE_API_KEY") or "").split(",")[0].strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = args.url.rstrip("/")
    if args.action == "index":
        path, body = "/v2/repository/index", {}
    else:
        path = f"/v2/repository/models/{args.model}/{args.action}"
        body = {"parameters": {"mode": "abort" if args.abort else "drain"}} if args.action == "unload" else {}
    try:
        r = httpx.post(url + path, json=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"llmcore repo {args.action}: error: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        try:
            msg = r.json().get("error")
        except ValueError:
            msg = r.text
        print(f"llmcore repo {args.action}: error ({r.status_code}): {msg}", file=sys.stderr)
        return 1
    if args.action == "index":
        for row in r.json():
            reason = f"  ({row['reason']})" if row.get("reason") else ""
            print(f"{row['name']:<24} {row.get('version') or '-':>7}  {row['state']}{reason}")
    else:
        print(f"{args.model}: {args.action}ed")
    return 0
