"""README.md: at most 150 lines, the Quickstart block as CI runs it, and every command in
it run somewhere: by CI (.ci/run runs the Quickstart block verbatim; tools/ci_docs.sh
runs the site's commands verbatim) or here."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)
QUICKSTART = 'pip install . && npattn verify\npip install -e ".[test]" && python -m pytest\n'


def commands():
    """Every shell command of the README's bash blocks, comments removed."""
    out = []
    for lang, body in BLOCKS:
        if lang in ("bash", "sh", "console", "shell"):
            for line in body.splitlines():
                cmd = re.sub(r"\s+#.*$", "", line).strip()
                if cmd and not cmd.startswith("#"):
                    out.append(cmd)
    return out


def test_at_most_150_lines():
    assert len(README.splitlines()) <= 150


def test_quickstart_block_is_the_one_ci_runs():
    # .ci/run reads the first bash block after "## Quickstart" and runs it verbatim
    after = README[README.index("## Quickstart"):]
    body = re.search(r"^```bash\n(.*?)^```", after, flags=re.S | re.M).group(1)
    assert body == QUICKSTART
    assert "## Quickstart" in (ROOT / ".ci" / "run").read_text()


def run_npattn(cmd, cwd):
    """A README line `npattn ...` run as `python -m npattn ...` (this checkout's npattn)."""
    argv = shlex.split(cmd)
    assert argv[0] == "npattn"
    env = dict(os.environ, NPATTN_GOLDEN=str(ROOT / "golden"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "npattn", *argv[1:]], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


def test_validate_commands_run(tmp_path):
    """The validation start: list, export, then check results saved under the fixture's keys."""
    cmds = [c for c in commands() if c.startswith(("npattn list", "npattn export", "npattn check"))]
    assert [c.split()[1] for c in cmds] == ["list", "export", "check"]
    r = run_npattn(cmds[0], tmp_path)
    assert r.returncode == 0, r.stdout
    assert "aff/c8_r4_train_f64" in r.stdout
    r = run_npattn(cmds[1], tmp_path)
    assert r.returncode == 0, r.stdout
    case_dir = tmp_path / shlex.split(cmds[1])[3]
    assert (case_dir / "inputs.npz").is_file() and (case_dir / "state_dict.npz").is_file()
    # "your implementation": npattn's AFF on the exported case, its results under the fixture's keys
    import json

    import npattn

    meta = json.loads((case_dir / "case.json").read_text())
    inputs = dict(np.load(case_dir / "inputs.npz"))
    params = dict(np.load(case_dir / "state_dict.npz"))
    dy = np.load(case_dir / "grad_output.npy")
    blk = npattn.AFF(**meta["config"], dtype=dy.dtype)
    blk.load_state_dict(params)
    y, cache = blk.forward(inputs["x"], inputs["residual"], training=meta["mode"] == "train")
    (dx, dres), pgrads = blk.backward(dy, cache)
    mine = {"output": y, "grad.input.x": dx, "grad.input.residual": dres}
    mine.update({f"grad.param.{k}": v for k, v in pgrads.items()})
    np.savez(tmp_path / shlex.split(cmds[2])[3], **mine)
    r = run_npattn(cmds[2], tmp_path)
    assert r.returncode == 0, r.stdout
    # and a wrong result fails
    mine["grad.input.x"] = dx * 1.001
    np.savez(tmp_path / shlex.split(cmds[2])[3], **mine)
    assert run_npattn(cmds[2], tmp_path).returncode == 1


def test_explain_command_runs(tmp_path):
    cmds = [c for c in commands() if c.startswith("npattn explain")]
    assert cmds
    for cmd in cmds:
        r = run_npattn(cmd, tmp_path)
        assert r.returncode == 0, r.stdout[-3000:]


def test_every_command_is_run_somewhere():
    quickstart = QUICKSTART.splitlines() + [p.strip() for line in QUICKSTART.splitlines() for p in line.split("&&")]
    ci_docs = [line.strip() for line in (ROOT / "tools" / "ci_docs.sh").read_text().splitlines()]
    run_here = ("npattn list", "npattn export ", "npattn check ", "npattn explain ")  # the tests above
    missing = [c for c in commands() if c not in quickstart and c not in ci_docs and not c.startswith(run_here)]
    assert not missing, f"README commands that neither CI nor a test runs: {missing}"


def test_python_examples_run():
    code = [body for lang, body in BLOCKS if lang == "python"]
    assert code
    for body in code:
        exec(compile(body, "README.md", "exec"), {})


def test_links_to_files_exist():
    for path in re.findall(r"`((?:docs|tools|tests|npattn)/[\w./-]+)`", README):
        assert (ROOT / path).exists(), path
