"""Downloaded artifacts live in one folder per process, gone when the process exits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WRITE_AND_EXIT = """
import sys
from pathlib import Path
from ftflow.tasks.registry.downloads import download_dir
folders = [Path(download_dir("adapter-")), Path(download_dir("champion-"))]
for f in folders:
    (f / "adapter_model.safetensors").write_bytes(b"x" * 1024)
print(folders[0].parent)
print(*folders, sep="\\n")
"""


def test_a_process_s_downloads_are_removed_when_it_exits(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", WRITE_AND_EXIT], env=env, capture_output=True, text=True, check=True)
    root, *folders = map(Path, out.stdout.split())
    assert root.parent == tmp_path and root.name.startswith("ftflow-downloads-")
    assert [f.parent for f in folders] == [root, root] and folders[0] != folders[1]
    assert not root.exists() and list(tmp_path.iterdir()) == []


FORK = """
import os, sys
from pathlib import Path
from ftflow.tasks.registry.downloads import download_dir
mine = Path(download_dir("adapter-"))
(mine / "kept").write_text("the parent still reads this")
read, write = os.pipe()
if os.fork() == 0:  # the child: a folder of its own, then a normal exit, which runs atexit
    os.write(write, download_dir("child-").encode())
    sys.exit(0)
os.close(write)
child = Path(os.read(read, 4096).decode())
os.wait()
print(child.parent != mine.parent, not child.exists(), (mine / "kept").read_text())
"""


def test_a_forked_child_gets_its_own_folder_and_its_exit_leaves_the_parent_s(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", FORK], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True True the parent still reads this"
    assert list(tmp_path.iterdir()) == []
