"""Fails when a locked dependency declares a newer rust-version than the
workspace does: the declared MSRV must be what the dependency graph needs.
Reads `cargo metadata --locked` on stdin."""

import json
import sys


def version(text):
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


metadata = json.load(sys.stdin)
members = set(metadata["workspace_members"])
ours = {version(p["rust_version"]) for p in metadata["packages"] if p["id"] in members and p.get("rust_version")}
if len(ours) != 1:
    sys.exit(f"msrv: the workspace crates declare {len(ours)} different rust-versions; expected one")
declared = ours.pop()
newer = sorted(
    (version(p["rust_version"]), p["name"], p["version"])
    for p in metadata["packages"]
    if p["id"] not in members and p.get("rust_version") and version(p["rust_version"]) > declared
)
if newer:
    need, name, ver = newer[-1]
    sys.exit(
        f"msrv: rust-version {'.'.join(map(str, declared))} is declared, but {name} {ver} "
        f"needs {'.'.join(map(str, need))} ({len(newer)} crate(s) need more): raise it in Cargo.toml"
    )
highest = max(
    (version(p["rust_version"]) for p in metadata["packages"] if p["id"] not in members and p.get("rust_version")),
    default=(0, 0, 0),
)
print(
    f"msrv: rust-version {'.'.join(map(str, declared))} declared; "
    f"the locked dependencies need at most {'.'.join(map(str, highest))}"
)
