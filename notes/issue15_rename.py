"""Rename omopfl.federation modules (issue 15 split). Usage: python rename.py ROOT [--move]"""
import re, subprocess, sys
from pathlib import Path

MAP = {
    "client_app": "site.statistics", "site_app": "site.app", "site_train": "site.training",
    "site_validate": "site.validation", "site_covariates": "site.covariates", "worker": "site.worker",
    "site_runtime": "site.runtime", "site_exec": "site.superexec", "supernode": "site.node",
    "server_app": "coordinator.statistics", "server_train": "coordinator.training",
    "strategies": "coordinator.strategies", "discovery": "coordinator.discovery",
    "federated_validation": "coordinator.validation", "server": "coordinator.command",
    "run_view": "coordinator.run_view", "secure_stats": "coordinator.secure_statistics",
    "secure_train": "coordinator.secure_rounds", "runner": "local", "train": "local",
    "deploy": "processes", "flower_runtime": "flower_internals",
}
root = Path(sys.argv[1])
if "--move" in sys.argv:
    fed = root / "omopfl/federation"
    for d in ("site", "coordinator"):
        (fed / d).mkdir(exist_ok=True)
    for old, new in MAP.items():
        if old == "train":
            continue  # merged into local.py by hand
        src = fed / f"{old}.py"
        dst = fed / (new.replace(".", "/") + ".py")
        subprocess.run(["git", "mv", str(src), str(dst)], cwd=root, check=True)
    for asset in ("run_view.html", "run_view.js"):
        subprocess.run(["git", "mv", f"omopfl/federation/{asset}", f"omopfl/federation/coordinator/{asset}"],
                       cwd=root, check=True)

FROM_PKG = re.compile(r"^(\s*)from omopfl\.federation import ([A-Za-z_, ]+?)(\s*#.*)?$", re.M)
DOTTED = re.compile(r"omopfl\.federation\.(" + "|".join(sorted(MAP, key=len, reverse=True)) + r")\b")

def fix_from(m):
    indent, names, comment = m.group(1), m.group(2), m.group(3) or ""
    keep, lines = [], []
    for part in [p.strip() for p in names.split(",") if p.strip()]:
        name, _, alias = part.partition(" as ")
        name, alias = name.strip(), alias.strip() or name.strip()
        if name in MAP:
            new = MAP[name]
            parent, _, base = new.rpartition(".")
            mod = "omopfl.federation" + ("." + parent if parent else "")
            lines.append(f"{indent}from {mod} import {base}" + (f" as {alias}" if alias != base else ""))
        else:
            keep.append(part)
    if keep:
        lines.insert(0, f"{indent}from omopfl.federation import {', '.join(keep)}")
    if lines:
        lines[-1] += comment
    return "\n".join(lines)

for path in list(root.glob("omopfl/**/*.py")) + list(root.glob("tests/**/*.py")) + list(root.glob("bench/**/*.py")) \
        + list(root.glob("examples/**/*")) + list(root.glob("*.md")) + list(root.glob("notes/*.md")) \
        + [root / "pyproject.toml", root / "Makefile", root / "Dockerfile", root / "docker-compose.yml"] \
        + list(root.glob("scripts/*")) + list(root.glob(".ci/*")):
    if not path.is_file() or "CHANGELOG" in path.name or path.name == "NOTES.md":
        continue
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        continue
    new = FROM_PKG.sub(fix_from, text) if path.suffix == ".py" else text
    new = DOTTED.sub(lambda m: "omopfl.federation." + MAP[m.group(1)], new)
    if new != text:
        path.write_text(new)
        print("rewrote", path.relative_to(root))
