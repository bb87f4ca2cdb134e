"""A full disk under the repository: one clear error, nothing lost, and the
next backup works once there is room. The repository lives on a small tmpfs
mounted in a private mount namespace (unshare), so no host mount is touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import MiB

SCRIPT = textwrap.dedent("""
    set -u
    mnt="$1"; py="$2"; small="$3"; big="$4"; out="$5"
    mount -t tmpfs -o size=12m tmpfs "$mnt" || exit 99
    vm() { "$py" -m vmbackup "$@"; }
    vm init --repo "$mnt/repo" --compression none >/dev/null || exit 98
    vm backup-disk --repo "$mnt/repo" --vm keep --json "$small" > "$out/first.json" || exit 97
    vm backup-disk --repo "$mnt/repo" --vm big --json "$big" > "$out/full.stdout" 2> "$out/full.stderr"
    echo $? > "$out/full.rc"
    vm verify --repo "$mnt/repo" --read-data --json > "$out/verify.json"; echo $? > "$out/verify.rc"
    vm restore-disk --repo "$mnt/repo" "$(cut -d'"' -f4 "$out/first.json")" "$out/restored" > /dev/null 2>&1
    echo $? > "$out/restore.rc"
    find "$mnt/repo" -type f -exec touch -d '1 hour ago' {} +  # past gc's slack, without waiting
    vm gc --repo "$mnt/repo" --grace 0 --json > "$out/gc.json"
    head -c 2097152 "$big" > "$out/fits.img"
    vm backup-disk --repo "$mnt/repo" --vm big --json "$out/fits.img" > "$out/again.json"; echo $? > "$out/again.rc"
""")


def test_full_disk_is_reported_cleanly_and_loses_nothing(tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(os.urandom(2 * MiB))
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(24 * MiB))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "s.sh"
    script.write_text(SCRIPT)
    p = subprocess.run(
        [
            "unshare",
            "--mount",
            "--map-root-user",
            "bash",
            str(script),
            str(mnt),
            sys.executable,
            str(small),
            str(big),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)

    assert (out / "full.rc").read_text().strip() == "1"
    err = (out / "full.stderr").read_text()
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    assert (out / "full.stdout").read_text() == ""
    # The earlier backup still verifies and restores bit for bit.
    assert (out / "verify.rc").read_text().strip() == "0"
    assert json.loads((out / "verify.json").read_text())["backups_checked"] == 1
    assert (out / "restore.rc").read_text().strip() == "0"
    assert (out / "restored").read_bytes() == small.read_bytes()
    # gc reclaims what the failed backup wrote, and the next backup works.
    assert json.loads((out / "gc.json").read_text())["chunks_removed"] > 0
    assert (out / "again.rc").read_text().strip() == "0"
    assert json.loads((out / "again.json").read_text())["new_chunks"] == 2
