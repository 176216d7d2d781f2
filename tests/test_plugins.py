"""Third-party component types through the ``anymodal.components`` entry-point group.

Each test writes a tiny installed distribution (a package plus a ``*.dist-info`` with
``entry_points.txt``) into a temporary directory and runs anymodal in a subprocess with that
directory on ``PYTHONPATH``: nothing in the subprocess imports the plugin by hand, so the types
resolve only if the registry finds the entry points. Subprocesses also keep the plugin's types
out of this test session's registries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# The plugin: a generator type registered by importing a module (entry-point value = a module),
# and an input projector type registered by calling a function (entry-point value = a callable).
GENERATOR_MODULE = '''
"""A solid-colour image generator: conditioning {"colour": (1, 3)}; saved as one JSON file."""
import json
from pathlib import Path

import torch
from PIL import Image

from anymodal.generators import ImageSettings, ModalityGenerator
from anymodal.modality import Modality
from anymodal.registry import register_generator


@register_generator("test-solid")
class SolidGenerator(ModalityGenerator):
    type_name = "test-solid"
    modality = Modality.IMAGE
    settings_class = ImageSettings

    def __init__(self, config, size):
        super().__init__(config)
        self.size = size

    @classmethod
    def from_config(cls, config):
        if config.components is not None:
            return cls(config, int(config.components["size"]))
        return cls(config, json.loads((Path(config.pretrained) / "solid.json").read_text())["size"])

    @property
    def conditioning_shapes(self):
        return {"colour": (1, 3)}

    def encode_text(self, texts):
        return {"colour": torch.tensor([[[len(t) % 3, 1.0, -1.0]] for t in texts])}

    def render(self, conditioning, settings=None, rng=None, progress=False):
        settings = self.make_settings(settings)
        size = settings.height or self.size
        rgb = (torch.sigmoid(conditioning["colour"][:, 0].float()) * 255).round().to(torch.uint8).tolist()
        return [Image.new("RGB", (size, size), tuple(c)) for c in rgb]

    def save_pretrained(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "solid.json").write_text(json.dumps({"size": self.size}))

    def to(self, device):
        return self
'''

PROJECTOR_MODULE = '''
"""A mean-pooling input projector, registered by a function rather than on import."""
from torch import nn

from anymodal.registry import register_input_projector


class MeanPoolProjector(nn.Module):
    def __init__(self, in_tokens, in_dim, out_dim, config):
        super().__init__()
        self.num_tokens, self.out_dim = config.num_tokens, out_dim
        self.proj = nn.Linear(in_dim, out_dim * config.num_tokens)

    def forward(self, features):
        return self.proj(features.mean(dim=1)).reshape(features.shape[0], self.num_tokens, self.out_dim)


def register():
    register_input_projector("test-meanpool")(MeanPoolProjector)
'''

CONFIG = textwrap.dedent('''
    name: plugin-test
    llm:
      config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
               num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 320, max_position_embeddings: 256}
      tokenizer: bytes
      signal_tokens: {image: 2}
      max_new_tokens: 8
    encoders:
      clip:
        type: clip
        modalities: [image]
        options:
          output: tokens
          config: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
                   image_size: 16, patch_size: 8, projection_dim: 16}
    input_projectors:
      image: {type: test-meanpool, num_tokens: 2}
    output_projectors:
      image: {type: transformer, targets: {colour: [1, 3]}, hidden_dim: 16, num_layers: 1, num_heads: 2}
    generators:
      image: {type: test-solid, components: {size: 8}}
''')

# Build from the config, teach the LLM to answer with an image, check the plugin's image, save.
BUILD_AND_SAVE = '''
import sys
import torch
torch.set_num_threads(1)
from anymodal import AnyModalPipeline
from conftest import teach

torch.manual_seed(0)  # the random init, so that teaching starts from the same weights every run
pipe = AnyModalPipeline.from_pretrained(sys.argv[1])
teach(pipe, [("paint", "<img_0><img_1>")], steps=150, lr=1e-2)
steps = []
# the plugin's render takes no on_step (written before it existed): it reports no steps, and works
out = pipe("paint", seed=0, on_step=lambda *step: steps.append(step))
assert len(out.images[0]) == 1 and out.images[0][0].size == (8, 8) and steps == [], (out, steps)
out.images[0][0].save(sys.argv[3])
pipe.save_pretrained(sys.argv[2])
'''


def _write_plugin(site: Path) -> None:
    pkg = site / "anymodal_testplugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "generators.py").write_text(GENERATOR_MODULE)
    (pkg / "projectors.py").write_text(PROJECTOR_MODULE)
    dist = site / "anymodal_testplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: anymodal-testplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[anymodal.components]\n"
        "solid = anymodal_testplugin.generators\n"
        "meanpool = anymodal_testplugin.projectors:register\n")


def _run(args: list[str], site: Path | None, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    paths = [str(ROOT / "tests")] + ([str(site)] if site is not None else [])
    # the caller's own entries last (bench/mutations.py puts its copy of anymodal there)
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "anymodal", *args]


@pytest.fixture()
def plugin(tmp_path: Path) -> tuple[Path, Path]:
    site = tmp_path / "site"
    _write_plugin(site)
    config = tmp_path / "plugin.yaml"
    config.write_text(CONFIG)
    return site, config


def test_info_reports_unknown_types_and_finds_plugins(plugin, tmp_path):
    site, config = plugin
    # without the plugin installed: both unknown types are named, each with the registered ones
    bare = _run(_cli("info", str(config)), None, tmp_path)
    assert bare.returncode == 2, bare.stderr
    assert "input_projectors.image.type: unknown input projector type 'test-meanpool'; " \
           "registered: linear, mlp, qformer" in bare.stderr
    assert "generators.image.type: unknown generator type 'test-solid'; registered: animatediff" in bare.stderr
    assert "'anymodal.components' entry-point group" in bare.stderr
    # installed: the entry points load on lookup, and the config validates
    ok = _run(_cli("info", str(config)), site, tmp_path)
    assert ok.returncode == 0, ok.stderr
    data = yaml.safe_load(ok.stdout)  # info prints the config as YAML, like the configs themselves
    assert data["generators"]["image"]["type"] == "test-solid"
    assert "plugins loaded: solid, meanpool" in ok.stderr or "plugins loaded: meanpool, solid" in ok.stderr


def test_plugin_types_work_in_the_cli_and_survive_save_and_reload(plugin, tmp_path):
    site, config = plugin
    script = tmp_path / "build.py"
    script.write_text(BUILD_AND_SAVE)
    saved, first = tmp_path / "saved", tmp_path / "first.png"
    built = _run([sys.executable, str(script), str(config), str(saved), str(first)], site, tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    index = json.loads((saved / "anymodal_index.json").read_text())
    assert index["components"]["generators"]["image"] == {"kind": "saved", "path": "generators/image"}
    assert (saved / "generators" / "image" / "solid.json").is_file()

    # a fresh process: the saved pipeline names plugin types, which load through the entry points
    out_dir = tmp_path / "out"
    gen = _run(_cli("generate", "paint", "--model", str(saved), "--out", str(out_dir)), site, tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    again = np.asarray(Image.open(out_dir / "image_0.png"))
    assert again.shape == (8, 8, 3) and (again == again[0, 0]).all()  # the plugin's solid colour
    np.testing.assert_allclose(again.astype(int), np.asarray(Image.open(first)).astype(int), atol=1)

    # and without the plugin, the reload fails naming the missing type
    bare = _run(_cli("generate", "paint", "--model", str(saved), "--out", str(tmp_path / "o2")), None, tmp_path)
    assert bare.returncode == 2 and "unknown input projector type 'test-meanpool'" in bare.stderr, bare.stderr


def test_a_broken_plugin_is_named_and_the_rest_still_load(plugin, tmp_path):
    site, config = plugin
    ep = site / "anymodal_testplugin-0.1.dist-info" / "entry_points.txt"
    ep.write_text(ep.read_text() + "broken = anymodal_testplugin.no_such_module\n")
    res = _run(_cli("info", str(config)), site, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "anymodal plugin 'broken' (anymodal_testplugin.no_such_module) failed to load" in res.stderr
    # an unknown type now also says which plugin failed, since it may be the one that registers it
    bad = config.read_text().replace("type: test-solid", "type: test-solidd")
    (tmp_path / "bad.yaml").write_text(bad)
    res = _run(_cli("info", str(tmp_path / "bad.yaml")), site, tmp_path)
    assert res.returncode == 2
    assert "unknown generator type 'test-solidd'" in res.stderr and "test-solid," in res.stderr
    assert "plugins that failed to load: broken: 'anymodal_testplugin.no_such_module' raised " \
           "ModuleNotFoundError" in res.stderr


def test_a_plugin_whose_import_exits_is_named_and_skipped(plugin, tmp_path):
    """A plugin calling sys.exit(3) on import once made every command, --help included, exit 3 silently."""
    site, config = plugin
    body, said = "import sys\nsys.exit(3)\n", "sys.exit(3)"
    (site / "anymodal_testplugin" / "exits.py").write_text(body)
    ep = site / "anymodal_testplugin-0.1.dist-info" / "entry_points.txt"
    ep.write_text(ep.read_text() + "exits = anymodal_testplugin.exits\n")
    named = f"anymodal plugin 'exits' (anymodal_testplugin.exits) failed to load and is skipped: {said}"
    top = _run(_cli("--help"), site, tmp_path)
    assert top.returncode == 0 and "generate" in top.stdout, top.stderr
    sub = _run(_cli("generate", "--help"), site, tmp_path)  # loads the plugins (their modalities get options)
    assert sub.returncode == 0 and "--image FILE" in sub.stdout, sub.stderr
    assert named in sub.stderr and "Traceback" not in sub.stderr
    # a command that does not need it runs, and says it was skipped (one line, no source listing)
    ok = _run(_cli("info", str(config)), site, tmp_path)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["generators"]["image"]["type"] == "test-solid", ok.stderr
    assert f"anymodal: warning: {named}" in ok.stderr.splitlines()
    # a command that needs a type the skipped plugin may have registered says so
    (tmp_path / "needs.yaml").write_text(config.read_text().replace("type: test-solid", "type: test-exits"))
    bad = _run(_cli("info", str(tmp_path / "needs.yaml")), site, tmp_path)
    assert bad.returncode == 2 and "unknown generator type 'test-exits'" in bad.stderr
    assert f"plugins that failed to load: exits: 'anymodal_testplugin.exits' raised {said}" in bad.stderr
