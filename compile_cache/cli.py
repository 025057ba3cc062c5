"""``llmcore cache ...``: list, verify, prune and remove compiled-model cache entries.

The main CLI calls ``add_cache_parser(subparsers)`` and dispatches with
``args.func(args)``; ``python -m compile_cache`` runs the same commands
stand-alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any, List, Optional, Sequence

from .errors import CacheError
from .fsutil import human_age, human_size
from .manifest import OK
from .paths import ENV_CACHE_DIR, ENV_SHARED_CACHE_DIR, default_cache_dir
from .store import CompileCache


def _description() -> str:
    return f"""\
Inspect and clean the cache of ahead-of-time compiled models (torch
AOTInductor packages, Neuron and RBLN compiler output).

An entry is reused only if ALL of its key matches: a content fingerprint of
the model (config.json + every weight file's sha256), plugin and version,
compiler and version, compiler flags, dtype, quantization, static shapes
(batch sizes, max sequence length, block size), tensor parallel degree,
target hardware and plugin extras. Each entry is a directory named by the
first 16 hex digits of the key's sha256, with a manifest.json listing every
file's size and sha256; entries are checked before use, and a corrupt,
partial or incompatible one is discarded and rebuilt.

Where it lives:
  --cache-dir, else ${ENV_CACHE_DIR}, else $XDG_CACHE_HOME/llmcore/compiled
  (currently default: {default_cache_dir()}).
  ${ENV_SHARED_CACHE_DIR} (or --shared-cache-dir): a read-only cache (e.g.
  on a team file share) consulted on a miss; hits are copied locally.

Statuses: ok, corrupt (hash/size/key mismatch), incomplete (missing
manifest or file, interrupted build), incompatible (other format version).

examples:
  llmcore cache ls                       entries, status, size, age
  llmcore cache verify                   hash every file; exit 1 if an entry is bad
  llmcore cache prune --older-than 30d --dry-run
  llmcore cache rm 3f2a9c                one entry, by digest prefix
"""


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s', '2w', '1h30m' or plain seconds -> seconds."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if not m:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 7d, 12h, 30m, 45s or 1h30m")
    return total


def _add_dir_options(p: argparse.ArgumentParser, top: bool) -> None:
    # On sub-commands the default is SUPPRESS so `cache --cache-dir X ls` and
    # `cache ls --cache-dir X` both work without one overwriting the other.
    default = None if top else argparse.SUPPRESS
    p.add_argument("--cache-dir", metavar="DIR", default=default,
                   help=f"cache root (default: ${ENV_CACHE_DIR} or {default_cache_dir()})")
    p.add_argument("--shared-cache-dir", metavar="DIR", default=default,
                   help=f"read-only shared cache (default: ${ENV_SHARED_CACHE_DIR})")


def add_cache_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``cache`` (with ls / verify / prune / rm) on an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("cache", help="list, verify and clean compiled-model cache entries",
                              description=_description(), formatter_class=fmt)
    _add_dir_options(p, top=True)
    sub = p.add_subparsers(dest="cache_command", metavar="COMMAND")

    ls = sub.add_parser("ls", help="list entries with status, size, age and what they are",
                        description="List cache entries. Quick check by default (manifest, key, "
                                    "file sizes); --verify also hashes every file.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--verify", action="store_true", help="also check sha256 of every file (slow)")

    verify = sub.add_parser("verify", help="check every file's sha256; exit 1 if any entry is bad",
                            description="Fully verify entries (manifest, key, size and sha256 of every "
                                        "file). Exit status 1 if any entry is not ok; `cache prune` "
                                        "removes bad ones.")
    verify.add_argument("key", nargs="?", metavar="KEY", help="digest or unique prefix (default: all)")
    verify.add_argument("--json", action="store_true", help="machine-readable output")

    prune = sub.add_parser("prune", help="remove crash leftovers, bad entries and (optionally) unused ones",
                           description="Remove temp dirs left by interrupted builds and corrupt, "
                                       "incomplete or incompatible entries. With --older-than, also "
                                       "remove valid entries not used (hit or built) for that long. "
                                       "Entries being built (key locked) are never touched.")
    prune.add_argument("--older-than", metavar="AGE", type=parse_duration,
                       help="also remove valid entries unused for AGE (e.g. 7d, 12h, 30m)")
    prune.add_argument("--invalid-only", action="store_true", help="never remove valid entries")
    prune.add_argument("--dry-run", action="store_true", help="only print what would be removed")

    rm = sub.add_parser("rm", help="remove one entry", description="Remove one entry by digest or unique prefix.")
    rm.add_argument("key", metavar="KEY", help="digest or unique prefix, as shown by `cache ls`")

    for sp in (ls, verify, prune, rm):
        _add_dir_options(sp, top=False)
    p.set_defaults(func=run_cache_command, cache_parser=p)
    p.commands = sub  # so a layer above (llmcore) can add commands that need more than the store
    return p


def run_cache_command(args: argparse.Namespace) -> int:
    """Run a parsed ``cache`` command. Exit codes: 0 ok, 1 bad entries found, 2 error/usage."""
    cmd = getattr(args, "cache_command", None)
    if not cmd:
        parser = getattr(args, "cache_parser", None)
        if parser is not None:
            parser.print_help()
        return 2
    cache = CompileCache(root=getattr(args, "cache_dir", None), shared=getattr(args, "shared_cache_dir", None))
    try:
        return _COMMANDS[cmd](cache, args)
    except CacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _cmd_ls(cache: CompileCache, args: argparse.Namespace) -> int:
    rows = cache.ls_details(verify_hashes=args.verify)
    now = time.time()
    if args.json:
        for r in rows:
            r["age_seconds"] = round(now - r["created_at"], 3)
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    print(f"cache: {cache.root}" + (f"   shared: {cache.shared}" if cache.shared else ""))
    if not rows:
        print("no entries")
        return 0
    table = [("DIGEST", "STATUS", "SIZE", "AGE", "USED", "SUMMARY")]
    for r in rows:
        table.append((r["short"], r["status"], human_size(r["size_bytes"]), human_age(now - r["created_at"]),
                      human_age(now - r["last_used"]) + " ago", r["summary"]))
    widths = [max(len(t[i]) for t in table) for i in range(5)]
    for t in table:
        cells = [t[0].ljust(widths[0]), t[1].ljust(widths[1]), t[2].rjust(widths[2]),
                 t[3].rjust(widths[3]), t[4].rjust(widths[4]), t[5]]
        print("  ".join(cells).rstrip())
    bad = sum(1 for r in rows if r["status"] != OK)
    total = sum(r["size_bytes"] for r in rows)
    print(f"{len(rows)} item(s), {human_size(total)}" + (f", {bad} not ok (`cache prune` removes them)" if bad else ""))
    return 0


def _cmd_verify(cache: CompileCache, args: argparse.Namespace) -> int:
    rows = cache.verify(args.key)
    bad = [r for r in rows if r.status != OK]
    if args.json:
        print(json.dumps([r._asdict() for r in rows], indent=2))
    else:
        if not rows:
            print(f"no entries in {cache.root}")
        for r in rows:
            print(f"{r.digest[:16]}  {r.status:<12}  {r.problem}".rstrip())
        if rows:
            print(f"{len(rows) - len(bad)} ok, {len(bad)} bad" + ("; run `cache prune` to remove bad entries" if bad else ""))
    return 1 if bad else 0


def _cmd_prune(cache: CompileCache, args: argparse.Namespace) -> int:
    removed = cache.prune(older_than_seconds=args.older_than, invalid_only=args.invalid_only, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for p in removed:
        print(f"{verb} {p}")
    print(f"{verb} {len(removed)} item(s)")
    return 0


def _cmd_rm(cache: CompileCache, args: argparse.Namespace) -> int:
    print(f"removed {cache.remove(args.key)}")
    return 0


_COMMANDS = {"ls": _cmd_ls, "verify": _cmd_verify, "prune": _cmd_prune, "rm": _cmd_rm}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point: ``python -m compile_cache cache ls`` (or just ``ls``)."""
    parser = argparse.ArgumentParser(prog="python -m compile_cache")
    sub = parser.add_subparsers(dest="command")
    add_cache_parser(sub)
    argv_list: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not argv_list or argv_list[0] != "cache":
        argv_list.insert(0, "cache")
    args = parser.parse_args(argv_list)
    return args.func(args)
