"""segcompare.models.variants: the variant table and family facts, checked against the models
themselves; the public API the README shows; and that the models' modules import without a cycle."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import segcompare.models
from segcompare.infer.fast import prepare_for_inference
from segcompare.models import hrnet, segformer, variants

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "segcompare" / "models"


def _meta(name: str, num_classes: int = 19) -> nn.Module:
    with torch.device("meta"):
        return variants.create(name, num_classes)


def test_the_eleven_variants_with_their_family_and_class():
    expected = {
        **{name: ("segformer", segformer.SegFormer) for name in segformer.VARIANTS},
        **{name: ("hrnet", hrnet.HRNet) for name in hrnet.VARIANTS},
    }
    assert len(expected) == 11
    assert variants.list_models() == list(expected)  # SegFormers first, in table order
    for name, (family, cls) in expected.items():
        assert variants.family_of(name) == family
        model = _meta(name)
        assert type(model) is cls
        assert variants.family_of(model) == family


def test_a_model_carries_its_variant_and_settings_from_its_constructor():
    model = _meta("hrnet-w18-small-v1")
    assert model.variant == "hrnet-w18-small-v1"
    assert model.settings == hrnet.VARIANTS["hrnet-w18-small-v1"]
    model.settings["stage4"]["num_modules"] = 7  # a copy: the table stays as it is
    assert hrnet.VARIANTS["hrnet-w18-small-v1"]["stage4"]["num_modules"] == 1

    with torch.device("meta"):
        custom = segformer.SegFormer(5, **segformer.VARIANTS["segformer-b0"])
    assert custom.variant is None
    assert custom.settings == segformer.VARIANTS["segformer-b0"]
    # plain attributes: the state dict holds only the official keys
    assert not any("variant" in k or "settings" in k for k in custom.state_dict())


@pytest.mark.parametrize("name", ["segformer-b0", "hrnet-w18-small-v1"])
def test_family_head_and_classifier_prefixes_match_the_model(name):
    family = variants.FAMILIES[variants.family_of(name)]
    state = _meta(name, num_classes=7).state_dict()
    head = [k for k in state if k.startswith(family.head_prefix)]
    # the head is the keys after the backbone, in the official order
    assert head and list(state)[-len(head) :] == head
    assert state[family.classifier_prefix + "weight"].shape[0] == 7
    assert state[family.classifier_prefix + "bias"].shape == (7,)


def test_family_of_a_prepared_model_an_unknown_name_and_an_unknown_object():
    torch.manual_seed(0)
    prepared = prepare_for_inference(variants.create("hrnet-w18-small-v1", 3))
    assert not isinstance(prepared, hrnet.HRNet)
    assert variants.family_of(prepared) == "hrnet"  # by the variant it carries

    with pytest.raises(ValueError, match="unknown model 'segformer-b9'; valid names: segformer-b0"):
        variants.family_of("segformer-b9")
    with pytest.raises(TypeError, match="not a segcompare model: Conv2d"):
        variants.family_of(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="not a segcompare model: int"):
        variants.family_of(3)


def test_model_settings_overrides_and_unknown_settings():
    settings = variants.model_settings("segformer-b0", drop_path_rate=0.2)
    assert settings == {**segformer.VARIANTS["segformer-b0"], "drop_path_rate": 0.2}
    with pytest.raises(ValueError, match="unknown setting.s. depth for segformer-b0"):
        variants.model_settings("segformer-b0", depth=3)


def test_the_official_test_recipes():
    # window and stride of each paper's Cityscapes test config (see the citations in variants.py)
    seg, hr = variants.FAMILIES["segformer"].test, variants.FAMILIES["hrnet"].test
    assert (seg.window_hw, seg.stride_hw, seg.score) == ((1024, 1024), (768, 768), "softmax")
    assert (hr.window_hw, hr.stride_hw, hr.score) == ((1024, 2048), (1024, 2048), "exp")
    assert hr.window_hw == variants.OFFICIAL_TEST_HW  # HRNet tests on the whole image


def test_the_public_api_the_readme_shows():
    from segcompare.models import (  # noqa: F401
        build_model,
        convert_checkpoint,
        count_parameters,
        list_models,
        load_weights,
    )

    readme = (ROOT / "README.md").read_text()
    imported = re.findall(r"from segcompare\.models import ([\w, ]+)", readme)
    dotted = re.findall(r"segcompare\.models\.(\w+)", readme)
    names = {n.strip() for line in imported for n in line.split(",")} | set(dotted)
    assert "load_weights" in names
    for name in names:
        assert hasattr(segcompare.models, name), name


def _imports_within_models(path: Path) -> set[str]:
    """The modules of segcompare.models that `path` imports (anywhere in it), by module name;
    `from segcompare.models import X` names the submodule X, else the package itself."""
    submodules = {p.stem for p in MODELS_DIR.glob("*.py")} - {"__init__"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "segcompare.models":
            for alias in node.names:
                found.add(alias.name if alias.name in submodules else "__init__")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "segcompare.models."
        ):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {
                a.name.split(".")[2] for a in node.names if a.name.startswith("segcompare.models.")
            }
    return found


def test_no_module_of_segcompare_models_imports_one_that_imports_it_back():
    graph = {p.stem: _imports_within_models(p) for p in MODELS_DIR.glob("*.py")}
    assert "checkpoint" in graph["__init__"] and "variants" in graph["checkpoint"]

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = [name for name in graph if reaches(name, name, {name})]
    assert not cycles, {name: sorted(graph[name]) for name in cycles}


def test_checkpoint_imports_alone_in_a_fresh_interpreter():
    code = (
        "import segcompare.models.checkpoint as c, sys; "
        "assert c.create.__module__ == 'segcompare.models.variants'; "
        "assert not hasattr(c, 'build_model'); print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
