"""Imports point one way: bot/web → worker → stars → payments → promo → billing → models → config
(`ops` — heartbeats, health, admin views — and `metrics` sit beside billing: models, config only).

Parses every top-level module with `ast` and fails on an import the layering forbids.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OURS = {"config", "models", "billing", "promo", "payments", "stars", "media", "texts", "worker", "bot", "web",
        "manage", "demo", "backup", "ops", "metrics", "startup"}

ALLOWED = {
    "config": set(),
    "texts": set(),
    "models": {"config"},
    "startup": {"config", "models"},          # entry points only: logging, start-up checks
    "media": {"config"},
    "billing": {"config", "models"},
    "ops": {"config", "models"},
    "metrics": {"config", "models", "ops"},
    "promo": {"config", "models", "billing"},
    "payments": {"config", "models", "billing", "promo"},
    "stars": {"config", "models", "billing", "payments"},     # Telegram Stars top-ups, beside payments
    "worker": {"config", "models", "billing", "promo", "payments", "stars", "media", "texts", "ops", "startup"},
    "bot": {"config", "models", "billing", "promo", "payments", "stars", "media", "texts", "worker", "ops",
            "startup"},
    "web": {"config", "models", "payments", "worker", "texts", "ops", "metrics", "startup"},
    "backup": set(),
    "manage": {"config", "models", "billing", "promo", "backup", "startup"},
    "demo": OURS - {"demo", "bot", "web"},
}


def imports_of(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def test_imports_point_one_way():
    problems = []
    for module, allowed in ALLOWED.items():
        path = os.path.join(ROOT, module + ".py")
        if not os.path.exists(path):
            continue
        for name in sorted(imports_of(path) - allowed - {module}):
            problems.append("%s imports %s" % (module, name))
    assert not problems, "forbidden imports: " + "; ".join(problems)


def test_nothing_imports_bot_or_web():
    offenders = []
    for name in os.listdir(ROOT):
        if name.endswith(".py") and name[:-3] not in ("bot", "web"):
            if imports_of(os.path.join(ROOT, name)) & {"bot", "web"}:
                offenders.append(name)
    assert not offenders, "modules importing bot or web: %s" % offenders


def test_checker_catches_a_forbidden_edge(tmp_path):
    bad = tmp_path / "billing.py"
    bad.write_text("import worker\nfrom bot import create_bot\n")
    assert imports_of(str(bad)) - ALLOWED["billing"] == {"worker", "bot"}
