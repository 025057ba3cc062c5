"""``llmcore devices``: every plugin found, whether it can run here and why, and what it can do."""

from __future__ import annotations

import argparse
import json

from llmcore.plugins import get_registry
from llmcore.selection import probe_all, select_device


def add_parser(sub) -> None:
    p = sub.add_parser(
        "devices",
        help="list device plugins, their scores and capability matrix",
        description=(
            "Probe every installed device plugin (no model is loaded) and print its score "
            "(0 = cannot run here, with the reason and a fix), the device chosen by default, "
            "and the capability matrix: dtypes, quantization methods, KV layout (paged blocks "
            "or fixed slots), whether it needs an ahead-of-time compile, static shapes, structured output "
            "(JSON schema, regex, grammar: the device returns logits to llmcore's sampler), memory. "
            "Plugins refused at load (wrong contract version, misspelled hook) are listed too."
        ),
        epilog="examples:\n"
               "  llmcore devices\n"
               "  llmcore devices --json | jq .default\n"
               "  LLMCORE_DISABLE_PLUGINS=cuda llmcore devices     # as if the cuda plugin were absent\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def collect() -> dict:
    registry = get_registry()
    reports = probe_all(registry)
    try:
        default = select_device(registry, reports, None).probe.name
    except Exception:
        default = None
    return {
        "default": default,
        "devices": [dict(plugin=r.plugin, source=registry.sources.get(r.plugin, ""), **r.probe.to_dict())
                    for r in reports],
        "refused": [{"name": r.name, "source": r.source, "reason": r.reason} for r in registry.refused],
        "disabled": registry.disabled,
    }


def _gib(n) -> str:
    return "-" if not n else f"{n / 2**30:.1f} GiB"


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [("device", "score", "status", "dtypes", "quantization", "KV layout", "compile", "static", "structured",
             "memory")]
    for d in info["devices"]:
        c = d["capabilities"]
        status = "default" if d["name"] == info["default"] else ("usable" if d["usable"] else "unusable")
        rows.append((
            d["name"], str(d["score"]), status, ",".join(c["dtypes"]),
            ",".join(c["quantization"]) or "none", c["kv_layout"],
            "yes" if c["needs_compile"] else "no", "yes" if c["static_shapes"] else "no",
            "yes" if c.get("structured_output", True) else "no",
            _gib(c["memory_bytes"]) + (f" x{c['device_count']}" if c["device_count"] > 1 else ""),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for d in info["devices"]:
        if d["usable"]:
            print(f"{d['name']}: {d['description'] or 'usable'}")
        else:
            print(f"{d['name']}: cannot run here: {d['reason']}")
            if d["hint"]:
                print(f"    fix: {d['hint']}")
    for r in info["refused"]:
        print(f"{r['name']}: REFUSED ({r['source']}): {r['reason']}")
    for name in info["disabled"]:
        print(f"{name}: disabled by LLMCORE_DISABLE_PLUGINS")
    if info["default"]:
        print(f"\ndefault device: {info['default']} (override with --device NAME)")
    else:
        print("\nno usable device")
        return 1
    return 0
