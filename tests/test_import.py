"""``import npattn`` must work without PyTorch and must not pull in torch or numba."""

import subprocess
import sys

BLOCK_TORCH = (
    "import sys\n"
    "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
    "sys.modules['torchvision'] = None\n"
)


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_without_torch_and_without_numba():
    r = run(
        BLOCK_TORCH
        + "import npattn, npattn.functional, npattn.gradcheck\n"
        + "import npattn.blocks\n"
        + "assert 'numba' not in sys.modules, 'import npattn imported numba'\n"
        + "assert 'cupy' not in sys.modules and 'onnx' not in sys.modules, 'import npattn imported an optional extra'\n"
        + "assert sys.modules.get('torch') is None\n"
        + "print('ok')\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_the_package_never_imports_torch_in_source():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "npattn"
    offenders = []
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import torch", "from torch")):
                offenders.append(f"{path}: {stripped}")
    assert not offenders, offenders


def test_public_names_of_the_issues_are_exported():
    import npattn

    names = {
        "SEBlock", "SKConv", "DAF", "AFF", "iAFF", "MS_CAM", "GCT", "DeformConv2d", "ModulatedDeformConv2dPack",
        "ConvOffset2D", "deform_conv2d", "deform_conv2d_forward", "deform_conv2d_backward", "batch_map_offsets",
        "gradcheck", "gradcheck_block", "DeformConv2dPack",
        "SEModule", "CBAM", "ECA", "CoordAttn", "GlobalContext", "SimAM",
        "NonLocalAttn", "ViTAttention", "MultiheadAttention",
        "scaled_dot_product_attention_forward", "scaled_dot_product_attention_backward",
    }
    assert names <= set(npattn.__all__)
    for n in npattn.__all__:
        assert getattr(npattn, n) is not None, n
