"""An encrypted repository through the flows, as a user runs them, and what
its copy's index and config withstand.

`vmbackup lab up --encrypted` (its own lab: SeaweedFS, a repository made
encrypted, the passphrase in STATE/passphrase, the plan's passphrase_env),
then `vmbackup backup --plan` twice (full, then incremental), `maintain
verify`, `maintain retention`, `restore --vm`, `copy --plan` and
`restore-disk --repo s3://...`, every restored disk equal to the backup;
a wrong passphrase is one line, exit 2, for backup, restore and the copy.
All of it at debug level: the passphrase, the S3 secret key and the local
server's auth string appear in no output, log, artifact, flow parameter,
process listing, the server's database, the state directory, a temporary
file, the repository or the copy's cache.

The copy's index is authenticated (docs/format.md §8): newer indexes that
someone with the bucket's credentials wrote (no MAC, a MAC under another
key, an authentic one replayed under a newer name) are skipped with a
warning; restore, snapshots and verify use the newest authentic one, and
the next copy does not trust the forged ones either.

A repository whose config says unencrypted beside key slots (a downgrade
of config.json) is refused: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from vmbackup import _mover, keys
from vmbackup import copy as s3copy
from vmbackup_lab import lab_down, load_lab

from .conftest import PASSWORD_ENV, base_env, run, sha
from .test_no_secret import PsSampler, _files_with, _server_holdings

TOPOLOGY = {
    "mode": "vcenter",
    "datacenter": "dc1",
    "clusters": [{"name": "cluster1", "hosts": ["esxe1"]}],
    "shared_datastores": ["sharede"],
    "agents_per_host": 1,
    "vms": [
        {"name": "enc-web", "host": "esxe1", "datastore": "sharede", "disks": [{"bus": "scsi", "size_mib": 8}]},
    ],
}
PASSPHRASE_ENV = "VMBACKUP_PASSPHRASE"


@pytest.fixture(scope="module")
def enc_lab(tmp_path_factory):
    """An encrypted lab of one VM, with its own S3 server; its `lab up --json` summary."""
    root = tmp_path_factory.mktemp("enc-lab")
    topology = root / "topology.json"
    topology.write_text(json.dumps(TOPOLOGY))
    env = base_env(root / "unused")
    p = run("lab", "up", "--state", str(root / "lab"), "--topology", str(topology), "--encrypted", "--json", env=env)
    summary = json.loads(p.stdout)
    try:
        yield summary
    finally:
        lab_down(root / "lab")


def _s3_env(s3: dict) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": s3["access_key"],
        "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _one_line_exit_2(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr[-3000:])
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("vmbackup: error: "), p.stderr[-3000:]
    for n in needles:
        assert n in p.stderr, p.stderr


def test_an_encrypted_lab_backs_up_restores_and_copies_with_no_secret_anywhere(enc_lab, tmp_path):
    assert enc_lab["encrypted"] is True and enc_lab["s3"], enc_lab
    plan_path = Path(enc_lab["plan"])
    data = yaml.safe_load(plan_path.read_text())
    assert data["passphrase_env"] == PASSPHRASE_ENV and "encryption" not in data, data
    passphrase = Path(enc_lab["passphrase_file"]).read_text().strip()
    s3 = enc_lab["s3"]
    repo = Path(data["repository"])
    assert keys.is_encrypted(repo)
    # a plan of our own: retention keeps each VM's newest only, the copy under a prefix of this test
    prefix = f"enc-{uuid.uuid4().hex[:8]}"
    data.update(retention={"last": 1}, copy=dict(data["copy"], prefix=prefix))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(data, sort_keys=False))
    lab = load_lab(Path(enc_lab["plan"]).parent)

    state, tmp, cache = tmp_path / "state", tmp_path / "tmp", tmp_path / "cache"
    tmp.mkdir()
    env = (
        base_env(state)
        | _s3_env(s3)
        | {
            PASSWORD_ENV: enc_lab["vsphere"]["password"],
            PASSPHRASE_ENV: passphrase,
            "TMPDIR": str(tmp),
            "VMBACKUP_CACHE_DIR": str(cache),
            "PREFECT_LOGGING_LEVEL": "DEBUG",
            "PREFECT_LOGGING_ROOT_LEVEL": "DEBUG",
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "DEBUG",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "vmbackup,urllib3,botocore",
        }
    )
    wrong = env | {PASSPHRASE_ENV: passphrase + "-wrong"}
    outputs: list[str] = []

    def vmb(*args: str, e: dict = env, expect: int | None = 0) -> subprocess.CompletedProcess:
        p = run(*args, env=e, expect=expect)
        outputs.extend([p.stdout, p.stderr])
        return p

    try:
        with PsSampler() as ps:
            full = json.loads(vmb("backup", "--plan", str(plan), "--json").stdout)["vms"]
            assert [(r["vm"], r["status"], r["mode"]) for r in full] == [("enc-web", "ok", "full")], full
            lab.write("enc-web", "scsi0:0", 1 << 20, 1 << 20, seed=77)
            incr = json.loads(vmb("backup", "--plan", str(plan), "--json").stdout)["vms"]
            assert [(r["vm"], r["status"], r["mode"]) for r in incr] == [("enc-web", "ok", "incremental")], incr
            point = incr[0]["backup_id"]
            # the chunks are sealed: the block the guest wrote is in none of them
            block = tmp_path / "lab.img"
            lab.disk_image("enc-web", "scsi0:0", block)
            with open(block, "rb") as f:
                f.seek(1 << 20)
                needle = f.read(4096)
            assert needle.strip(b"\0") and _files_with(repo / "chunks", needle) == []

            verified = json.loads(vmb("maintain", "verify", "--plan", str(plan), "--json").stdout)
            assert verified["ok"] is True and verified["backups_checked"] == 2, verified
            kept = json.loads(vmb("maintain", "retention", "--plan", str(plan), "--grace", "0", "--json").stdout)
            points = json.loads(vmb("snapshots", "--repo", str(repo), "--json").stdout)
            assert [b["id"] for b in points] == [point], (kept, points)

            restored = json.loads(vmb("restore", "--plan", str(plan), "--vm", "enc-web", "--json").stdout)["vms"]
            assert [(r["status"], r["point"], r["restored_as"]) for r in restored] == [
                ("ok", point, "enc-web-restored")
            ], restored
            image, saved = tmp_path / "restored-vm.img", tmp_path / "saved.img"
            lab.disk_image("enc-web-restored", "scsi0:0", image)
            vmb("restore-disk", "--repo", str(repo), "--disk", "scsi0:0", point, str(saved))
            assert sha(image) == sha(saved) == sha(block)

            copied = json.loads(vmb("copy", "--plan", str(plan), "--json").stdout)
            assert copied["backups"] == 1 and copied["uploaded"] == copied["objects"], copied
            t = s3copy.Target(
                s3copy.client(s3["endpoint"], s3["access_key"], s3["secret_key"], "us-east-1"), s3["bucket"], prefix
            )
            index = s3copy.read_index(t)
            assert len(index["mac"]) == 64 and "keys/" in "".join(index["objects"]), index["objects"].keys()
            assert index["version"] == 2  # authenticated: a reader of version 1 only refuses it
            url = f"s3://{s3['bucket']}/{prefix}"
            from_s3 = tmp_path / "from-s3.img"
            vmb("restore-disk", "--repo", url, "--disk", "scsi0:0", point, str(from_s3))
            assert sha(from_s3) == sha(saved)

            # A wrong passphrase: one line, exit 2, before anything starts.
            _one_line_exit_2(vmb("backup", "--plan", str(plan), e=wrong, expect=None), "opens no key slot")
            _one_line_exit_2(
                vmb("restore", "--plan", str(plan), "--vm", "enc-web", "--as", "x", e=wrong, expect=None),
                "opens no key slot",
            )
            _one_line_exit_2(vmb("copy", "--plan", str(plan), e=wrong, expect=None), "opens no key slot")
            _one_line_exit_2(
                vmb("restore-disk", "--repo", url, point, str(tmp_path / "no.img"), e=wrong, expect=None),
                "opens no key slot",
            )
            assert not (tmp_path / "no.img").exists()
        assert any("prefect server start" in s for s in ps.samples), "ps never saw the server"

        # No secret anywhere.
        status = json.loads(run("server", "status", "--json", env=base_env(state)).stdout)
        auth = (state / "api-auth").read_text().strip()
        held = _server_holdings(status["api_url"], auth)
        # the six runs (backup twice, verify, retention, restore, copy); the refused ones never started
        assert len(held["flow_runs"]) == 6 and held["logs"] and held["artifacts"], held["flow_runs"]
        assert any(" | DEBUG " in o for o in outputs), "nothing was logged at debug level"
        secrets_ = {"passphrase": passphrase, "S3 secret key": s3["secret_key"], "auth string": auth}
        texts = [("output", "\n".join(outputs)), ("ps", "\n".join(ps.samples))]
        texts += [(k, json.dumps(v)) for k, v in held.items()]
        for what, text in texts:
            for name, value in secrets_.items():
                assert value not in text, f"the {name} is in the {what}"
        db = sorted((state / "prefect").glob("prefect.db*"))
        assert db and (state / "server.log").is_file()
        for path in [*db, state / "server.log"]:
            stored = path.read_bytes()
            for name, value in secrets_.items():
                assert value.encode() not in stored, f"the {name} is in {path.name}"
        for name, value in secrets_.items():
            found = _files_with(state, value.encode())
            found += _files_with(tmp, value.encode()) + _files_with(repo, value.encode())
            found += _files_with(cache, value.encode())
            assert [f for f in found if f != str(state / "api-auth")] == [], f"the {name} is in {found}"
    finally:
        subprocess.run([sys.executable, "-m", "vmbackup", "server", "stop"], env=base_env(state), capture_output=True)


def _forge(t: s3copy.Target, index: dict, name: str, **change) -> str:
    """Writes ``index`` changed under ``index/<name>.json`` as an attacker with
    the copy's credentials would (Object Lock lets anyone who may write add objects)."""
    doc = {k: v for k, v in index.items() if k not in s3copy.READER_FIELDS} | change
    doc = {k: v for k, v in doc.items() if v is not None}
    rel = f"index/{name}.json"
    t.s3.put_object(Bucket=t.bucket, Key=t.key(rel), Body=json.dumps(doc).encode())
    return rel


def test_a_forged_index_is_skipped_for_the_newest_authentic_one(enc_lab, tmp_path):
    s3 = enc_lab["s3"]
    t = s3copy.Target(
        s3copy.client(s3["endpoint"], s3["access_key"], s3["secret_key"], "us-east-1"),
        s3["bucket"],
        f"forge-{uuid.uuid4().hex[:8]}",
    )
    url = f"s3://{t.bucket}/{t.prefix}"
    repo, pfile, img = tmp_path / "repo", tmp_path / "pass", tmp_path / "disk.img"
    passphrase = "forge-" + secrets.token_hex(8)
    pfile.write_text(passphrase + "\n")
    img.write_bytes(os.urandom(3 << 20))
    env = base_env(tmp_path / "state") | _s3_env(s3) | {"VMBACKUP_CACHE_DIR": str(tmp_path / "cache")}
    withkey = env | {PASSPHRASE_ENV: passphrase}
    run("init", "--repo", str(repo), "--encryption", "--passphrase-file", str(pfile), env=env)
    first = json.loads(run("backup-disk", "--repo", str(repo), "--vm", "vm1", "--json", str(img), env=withkey).stdout)

    # The copy needs the key: its index is authenticated with it.
    with pytest.raises(keys.KeyRequiredError):
        s3copy.copy_repository(repo, t, days=1)
    master = keys.master_key(repo, keys.KeySource(passphrase=keys.read_secret_file(str(pfile))))
    s3copy.copy_repository(repo, t, days=1, master_key=master)
    good = s3copy.read_index(t)
    assert s3copy.index_authentic(t, good, s3copy.index_key(master))

    # What an attacker with the copy's credentials writes, each newer than the copy's index:
    # no MAC (and no backups), a MAC under another key, the authentic index replayed under a newer name,
    # and one relabelled version 1 (the version is under the MAC too).
    other = s3copy.index_mac(os.urandom(32), "index/29990101T000000.000000Z-00000002.json", good)
    assert good["version"] == 2
    forged = [
        _forge(t, good, "29990101T000000.000000Z-00000001", mac=None, backups=[]),
        _forge(t, good, "29990101T000000.000000Z-00000002", mac=other),
        _forge(t, good, "29990101T000000.000000Z-00000003"),
        _forge(t, good, "29990101T000000.000000Z-00000004", version=1),
    ]
    restored = tmp_path / "restored.img"
    p = run("restore-disk", "--repo", url, first["id"], str(restored), env=withkey)
    assert sha(restored) == sha(img)
    for rel in forged:
        assert f"index {t.key(rel)} of {url} is not authentic" in p.stderr, p.stderr
    listed = json.loads(run("snapshots", "--repo", url, "--json", env=withkey).stdout)
    assert [b["id"] for b in listed] == [first["id"]]
    v = json.loads(run("verify", "--repo", url, "--read-data", "--json", env=withkey).stdout)
    assert v["ok"] is True and v["index"] == good["key"], v
    # Without the key the newest index is read unchecked (a warning says so): verify cannot tell.
    p = run("verify", "--repo", url, "--json", env=env)
    assert json.loads(p.stdout)["index"] == t.key(forged[-1]) and "not authenticated" in p.stderr, p.stderr

    # Only forged indexes to choose from: an error, one line.
    p = run("snapshots", "--repo", url, env=withkey | {"VMBACKUP_COPY_INDEX": forged[0]}, expect=1)
    assert p.stderr.count("\n") == 2 and "no index of" in p.stderr.splitlines()[-1], p.stderr  # a warning, the error

    # The next copy does not trust the forged indexes either, and writes an authentic one
    # that readers take (the forged ones stay newer by name: skipped still).
    img.write_bytes(os.urandom(3 << 20))
    second = json.loads(run("backup-disk", "--repo", str(repo), "--vm", "vm1", "--json", str(img), env=withkey).stdout)
    res = s3copy.copy_repository(repo, t, days=1, master_key=master)
    assert sum("not authentic" in w for w in res.warnings) == len(forged), res.warnings
    assert res.backups == 2 and res.uploaded >= 4, res  # the new chunks and manifest, and the index
    p = run("restore-disk", "--repo", url, second["id"], str(restored), "--force", env=withkey)
    assert sha(restored) == sha(img)


def test_a_config_downgraded_to_unencrypted_beside_key_slots_is_refused(tmp_path):
    env = base_env(tmp_path / "state")
    repo, plain, pfile, img = tmp_path / "repo", tmp_path / "plain", tmp_path / "pass", tmp_path / "disk.img"
    pfile.write_text("downgrade-" + secrets.token_hex(8) + "\n")
    img.write_bytes(os.urandom(2 << 20))
    run("init", "--repo", str(repo), "--encryption", "--passphrase-file", str(pfile), env=env)
    run("backup-disk", "--repo", str(repo), "--vm", "vm1", "--passphrase-file", str(pfile), str(img), env=env)
    # The attacker swaps in an unencrypted config of the same id (id key and all in the clear).
    _mover.init_repository(str(plain))
    config = json.loads((plain / "config.json").read_text())
    config["id"] = json.loads((repo / "config.json").read_text())["id"]
    (repo / "config.json").write_text(json.dumps(config))
    before = sorted(str(p) for p in repo.rglob("*"))
    for args in (
        ["backup-disk", "--repo", str(repo), "--vm", "vm1", str(img)],
        ["backup-disk", "--repo", str(repo), "--vm", "vm1", "--passphrase-file", str(pfile), str(img)],
        ["snapshots", "--repo", str(repo)],
        ["verify", "--repo", str(repo)],
    ):
        p = run(*args, env=env, expect=None)
        _one_line_exit_2(p, "key slot(s) in keys/", "config.json was altered")
    assert sorted(str(p) for p in repo.rglob("*")) == before  # nothing written in plaintext
