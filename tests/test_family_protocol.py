"""The family protocol is enough: a second family that lives only in tests (tiny_family.py) is
registered here, trains with `tapestry train`, exports, and generates through Pipeline and the
engine — with no change to tapestry/train or tapestry/infer. And nothing in tapestry/ or
benchmarks/ outside a family's own folder imports that folder."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tapestry.models import family as families
from tiny_family import TinyFamily

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
seed = 0
[model]
family = "tiny"
hidden = 32
layers = 1
vae = "pool:4"
vocab_size = 300
tokenizer_docs = 40
tokenizer_english_chars = 0
[layout]
target_size = [32, 32]
[data]
budget = 320
rows = 2
lookahead = 64
[[data.sources]]
name = "compose"
task = "compose"
side = 32
[dropout]
policy = "illume"
[ema]
decay = 0.5
[[stages]]
steps = 4
lr_scale = {heads = 0.5}
[checkpoint]
every = 4
[log]
every = 1
"""


@pytest.fixture(scope="module")
def tiny():
    family = families.register(TinyFamily())
    yield family
    families.unregister("tiny")


def test_train_infer_and_eval_import_no_family():
    offenders = []
    for package in ("train", "infer", "eval"):
        for path in sorted((ROOT / "tapestry" / package).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"tapestry\.models\.(mot|duet|mmi)\b|from tapestry\.models import (mot|duet|mmi)\b", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def _imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import in a source file: `import a.b`, `from a.b import c` (as
    a.b and a.b.c: c may be a module), relative imports resolved against the file's package,
    and importlib.import_module / __import__ of a literal name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = path.relative_to(root).parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # level 1: this file's package, 2: its parent, ...
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def _family_imports(root: Path) -> list[str]:
    """Every import of a built-in family's package from a module outside that family's folder,
    in tapestry/ and benchmarks/ under `root`."""
    offenders = []
    sources = sorted([*(root / "tapestry").rglob("*.py"), *(root / "benchmarks").rglob("*.py")])
    for name in families.BUILTIN:
        package, own = f"tapestry.models.{name}", root / "tapestry" / "models" / name
        for path in sources:
            if path.is_relative_to(own):
                continue
            for line, module in _imported_modules(path, root):
                if module == package or module.startswith(package + "."):
                    offenders.append(f"{path.relative_to(root)}:{line}: imports {module}")
    return offenders


def test_nothing_outside_a_family_folder_imports_a_family():
    # DESIGN §5: train/, infer/, eval/, serve/, the CLI and benchmarks/ reach a family only
    # through tapestry.models.family (its protocol, its commands, its benchmark parts)
    assert _family_imports(ROOT) == []


def test_the_import_scan_sees_every_form_of_import(tmp_path):
    probe = tmp_path / "tapestry" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import tapestry.models.mot.model\n"
                     "from tapestry.models import duet\n"
                     "from .mot.memory import Plan\n"
                     "from . import mmi\n"
                     "importlib.import_module('tapestry.models.mmi.mmfs')\n"
                     "from tapestry.models import family\n"
                     "from tapestry.models.family import get\n")
    own = tmp_path / "tapestry" / "models" / "mot" / "cli.py"  # a family's folder may import itself
    own.parent.mkdir()
    own.write_text("from tapestry.models.mot.memory import Plan\nfrom .bagel import BAGEL_7B\n")
    bench = tmp_path / "benchmarks" / "probe.py"
    bench.parent.mkdir()
    bench.write_text("def f():\n    from tapestry.models.mot.config import MoTConfig\n")
    assert sorted(_family_imports(tmp_path)) == sorted([
        "tapestry/models/probe.py:1: imports tapestry.models.mot.model",
        "tapestry/models/probe.py:2: imports tapestry.models.duet",
        "tapestry/models/probe.py:3: imports tapestry.models.mot.memory",
        "tapestry/models/probe.py:3: imports tapestry.models.mot.memory.Plan",
        "tapestry/models/probe.py:4: imports tapestry.models.mmi",
        "tapestry/models/probe.py:5: imports tapestry.models.mmi.mmfs",
        "benchmarks/probe.py:2: imports tapestry.models.mot.config",
        "benchmarks/probe.py:2: imports tapestry.models.mot.config.MoTConfig",
    ])


def test_a_familys_own_commands_mount_through_the_registry_without_torch():
    # `tapestry --help` lists mot's convert / memory / vit in their places, and building the CLI
    # imported neither torch nor any family's model
    probe = ("import sys, typer, tapestry.cli as cli\n"
             "print(list(typer.main.get_command(cli.app).commands))\n"
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('tapestry.models.')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    commands, modules = done.stdout.splitlines()
    assert commands == str(["validate", "view", "generate", "inspect", "convert", "memory", "serve", "train", "export",
                            "toyworld", "data", "vae", "vit", "eval"])
    modules = ast.literal_eval(modules)
    assert "torch" not in modules
    family_modules = [m for m in modules if m.split(".")[2] in families.BUILTIN]
    assert family_modules == ["tapestry.models.mot", "tapestry.models.mot.cli"]


def test_benchmarks_find_what_they_time_on_the_family_object():
    mot = families.get("mot").benchmark_parts()
    assert {"KVCache", "Context", "Block", "memory", "BAGEL_7B"} <= set(vars(mot))
    assert callable(mot.memory.estimate) and mot.BAGEL_7B.llm.num_layers == 28
    assert families.get("mmi").benchmark_parts().MMFS.__name__ == "MMFS"


def test_inspection_reaches_families_only_through_the_protocol():
    # `tapestry inspect` asks each family (Family.inspect); its own modules import none
    for path in (ROOT / "tapestry" / "models" / "inspection.py", ROOT / "tapestry" / "models" / "inspect_cli.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"tapestry\.models\.(mot|duet|mmi)\b|from tapestry\.models import (mot|duet|mmi)\b", text), path


def test_every_builtin_family_declares_its_loss_parts_and_inspects():
    for name in ("mot", "duet", "mmi"):
        family = families.get(name)
        assert family.loss_parts[0] == "text" and len(set(family.loss_parts)) == len(family.loss_parts)
        assert callable(family.inspect)
    assert families.get("mmi").loss_parts == ("text", "image")


def test_unknown_families_are_named_with_the_known_ones(tiny):
    with pytest.raises(families.FamilyError, match=r"unknown model family 'nope'; known families: duet, mmi, mot, tiny"):
        families.get("nope")
    assert families.family_name({"format": "tapestry.mot"}) == "mot"  # config.json before the field


@pytest.mark.slow
def test_a_test_only_family_trains_exports_and_generates(tiny, tmp_path):
    from tapestry.cli import app
    from tapestry.infer.engine import Engine, GenerationOptions
    from tapestry.infer.pipeline import Pipeline
    from tapestry.document import Document, TextSegment

    (tmp_path / "tiny.toml").write_text(CONFIG)
    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "run"), "--quiet"])
    assert trained.exit_code == 0, trained.output
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["text_loss"] > 0 for m in metrics)
    exported = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "out" / "pipeline.json").read_text())["family"] == "tiny"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["family"] == "tiny"

    pipe = Pipeline.from_pretrained(tmp_path / "out")
    assert type(pipe.engine.runtime).__name__ == "TinyRuntime"
    assert not any(p.requires_grad for p in pipe.engine.runtime.model.parameters())
    refs = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
    from tapestry.document import ImageSegment, from_markup

    prompt = from_markup("A [img1] left of a [img2].", refs, id="p")
    prompt.segments.append(ImageSegment("target", width=32, height=32))
    first = pipe.generate(prompt, seed=0, steps=2, guidance="inset")
    again = pipe.generate(prompt, seed=0, steps=2, guidance="inset")
    drawn = [s.image for s in first.images() if s.role == "target"]
    assert drawn and all(image.size == (32, 32) for image in drawn)
    assert [s.image.tobytes() for s in again.images() if s.role == "target"] == [i.tobytes() for i in drawn]
    assert first.meta["generation"]["guidance"] == "inset"

    # the engine directly: a target image in place, every guidance rule's branches on their contexts
    engine = Engine(tiny.runtime(pipe.engine.runtime.model, pipe.engine.tokenizer, pipe.engine.runtime.codec,
                                 pipe.engine.runtime.layout))
    doc = Document("t", [TextSegment("A red square."), ImageSegment("target", width=32, height=32)])
    for rule in ("none", "cfg", "bagel", "duetgen"):
        out = engine.generate(doc, GenerationOptions(seed=1, steps=2, guidance=rule))
        assert out.segments[1].image.size == (32, 32), rule
