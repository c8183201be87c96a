"""``g3n-zoo``: list, show, verify and locate the shipped demonstration models."""

from __future__ import annotations

import argparse
import sys

from .zoo import ZooError, get, manifest, root, verify


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="g3n-zoo", description=__doc__ + " Rebuild them with `g3n-zoo-build` "
                                "(g3n-pipeline). $G3N_ZOO_DIR points at another zoo folder.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="each model: stage, size, training steps and wall time")
    s = sub.add_parser("show", help="a model's card")
    s.add_argument("name")
    s = sub.add_parser("path", help="the path a model's stage loader takes (for shell use)")
    s.add_argument("name")
    sub.add_parser("verify", help="check every file against the manifest's SHA-256; exit 1 naming a bad file")
    a = p.parse_args(argv)
    try:
        if a.cmd == "list":
            m = manifest()
            print(f"zoo {root()}")
            for name, e in sorted(m.models.items()):
                card = get(name, verify=False).card
                tr = card.get("training") or {}
                print(f"  {name:14s} {e.stage:14s} {_size(sum(f.bytes for f in e.files.values())):>9s}  "
                      f"{tr.get('steps', '?')} steps, {tr.get('wall_minutes', '?')} min on {tr.get('machine', '?')}")
            total = sum(f.bytes for e in m.models.values() for f in e.files.values())
            print(f"  total {_size(total)}")
        elif a.cmd == "show":
            model = get(a.name, verify=False)
            md = model.folder / "card.md"
            print(md.read_text() if md.is_file() else model.card)
        elif a.cmd == "path":
            print(get(a.name).path)
        elif a.cmd == "verify":
            bad = verify()
            for line in bad:
                print(f"BAD {line}")
            if bad:
                return 1
            print(f"OK: {len(manifest().models)} models in {root()} match the manifest")
    except ZooError as e:
        print(f"g3n-zoo: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
