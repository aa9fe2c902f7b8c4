"""An installed wheel imports the same way as the editable checkout: one namespace, configs and weights inside."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, latentpatch, latentpatch.autoencoders, latentpatch.cli.app, latentpatch.configs
from latentpatch.autoencoders import builtin_folder
from latentpatch.config import builtin_config_names, load_config
print(json.dumps({
    "pkg": latentpatch.__file__, "ae": latentpatch.autoencoders.__file__, "cli": latentpatch.cli.app.__file__,
    "configs": builtin_config_names(), "demo_depth": load_config("demo").model.dit.depth,
    "vae_files": sorted(p.name for p in builtin_folder().iterdir()),
}))
"""


def _probe(cwd: Path, extra_path: str | None = None) -> dict:
    import json
    import os

    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_wheel_and_editable_install_import_the_same_namespace(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("latentpatch-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    from_wheel = _probe(tmp_path, str(site))
    editable = _probe(tmp_path)
    assert from_wheel["pkg"].startswith(str(site)) and from_wheel["ae"].startswith(str(site / "latentpatch"))
    assert editable["ae"] == str(REPO / "autoencoders" / "__init__.py")
    for probe in (from_wheel, editable):
        assert {"tiny", "demo", "dit-b2", "patch-latent", "full-size"} <= set(probe["configs"])
        assert probe["demo_depth"] == 4
        assert {"config.json", "diffusion_pytorch_model.safetensors"} <= set(probe["vae_files"])
    assert not (site / "autoencoders").exists() and not (site / "cli").exists()  # nothing at the top level
