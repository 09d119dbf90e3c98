"""RunStorage: local paths and file:// URIs in place; remote URIs through staging, marker-last."""
from __future__ import annotations

import os

import pytest
from pyarrow import fs as pafs

from orchestrator.storage import MARKER, RunStorage, StorageError

pytestmark = pytest.mark.unit


def make_ckpt(root, step: int) -> dict[str, bytes]:
    """A checkpoint-like tree (nested dirs, binary files) under ``root``; returns its contents."""
    files = {
        "model/model.safetensors": os.urandom(4096),
        "model/config.json": b'{"n": %d}' % step,
        "global_step/zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(1000) + b"\x00\xff",
        "global_step/deep/er/rng.bin": bytes(range(256)),
        "driver_state.json": b'{"step": %d}' % step,
        MARKER: b"%d" % step,
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def remote_bytes(st: RunStorage, rel: str) -> bytes:
    with st.fs.open_input_stream(st._remote(rel)) as fh:
        return fh.read()


# ---- local modes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_local_mode_writes_in_place(tmp_path, as_uri):
    run = tmp_path / "run"
    st = RunStorage(run.as_uri() if as_uri else str(run))
    assert not st.remote
    assert st.local_dir == run
    st.write_text("config.yaml", "a: 1\n")
    assert (run / "config.yaml").read_text() == "a: 1\n"
    files = make_ckpt(run / "checkpoints" / "step-0000002", 2)
    (run / "checkpoints" / "step-0000001").mkdir()  # no marker
    st.upload("checkpoints")  # no copies in local mode
    st.commit_dir("checkpoints/step-0000002")
    assert st.download("checkpoints/step-0000002") == run / "checkpoints" / "step-0000002"
    assert read_tree(run / "checkpoints" / "step-0000002") == files
    assert st.exists("config.yaml") and not st.exists("nope")
    assert st.list_dirs("checkpoints") == ["step-0000001", "step-0000002"]
    assert st.complete_dirs("checkpoints") == ["step-0000002"]
    st.delete("config.yaml")
    assert not (run / "config.yaml").exists()


def test_relative_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunStorage("runs/x").local_dir == tmp_path / "runs" / "x"


# ---- remote mode, without network ----------------------------------------------------------------
@pytest.fixture(params=["mock", "subtree"])
def remote(request, tmp_path):
    """A remote RunStorage over pyarrow's in-memory mock filesystem, or over a SubTreeFileSystem
    rooted in tmp_path (not addressed by local paths either way)."""
    if request.param == "mock":
        fs, base = pafs.FileSystem.from_uri("mock://")[0], "bucket/run"
    else:
        (tmp_path / "bucket").mkdir()
        fs, base = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()), "run"
    return RunStorage("s3://bucket/run", staging_root=tmp_path / "staging", filesystem=fs,
                      base_path=base)


def test_remote_stages_under_sanitised_uri(remote, tmp_path):
    assert remote.remote
    assert remote.local_dir == tmp_path / "staging" / "s3_bucket_run"
    remote.write_text("config.yaml", "a: 1\n")
    assert (remote.local_dir / "config.yaml").read_text() == "a: 1\n"
    assert remote_bytes(remote, "config.yaml") == b"a: 1\n"


def test_mock_uri_resolves_without_injection(tmp_path):
    st = RunStorage("mock://bucket/run", staging_root=tmp_path)
    assert st.remote and isinstance(st.fs, pafs.FileSystem)
    st.write_text("metrics.jsonl", '{"step": 1}\n')
    assert st.exists("metrics.jsonl")


def test_commit_uploads_tree_with_marker_last(remote, monkeypatch):
    files = make_ckpt(remote.local_dir / "checkpoints" / "step-0000003", 3)
    order, put = [], remote._put
    monkeypatch.setattr(remote, "_put", lambda local, dst: (order.append(dst), put(local, dst)))
    remote.commit_dir("checkpoints/step-0000003")
    assert order[-1].endswith("step-0000003/" + MARKER)
    assert sum(o.endswith(MARKER) for o in order) == 1
    for rel, data in files.items():
        assert remote_bytes(remote, f"checkpoints/step-0000003/{rel}") == data
    assert remote.complete_dirs("checkpoints") == ["step-0000003"]


def test_failed_upload_leaves_no_marker_and_is_cleared(remote, monkeypatch):
    make_ckpt(remote.local_dir / "checkpoints" / "step-0000001", 1)
    remote.commit_dir("checkpoints/step-0000001")
    make_ckpt(remote.local_dir / "checkpoints" / "step-0000002", 2)
    calls, put = [], remote._put

    def dying_put(local, dst):
        if len(calls) == 2:
            raise StorageError("connection reset")
        calls.append(dst)
        put(local, dst)

    monkeypatch.setattr(remote, "_put", dying_put)
    with pytest.raises(StorageError, match="connection reset"):
        remote.commit_dir("checkpoints/step-0000002")
    assert remote.exists("checkpoints/step-0000002")  # some files made it, but no marker
    assert not remote.exists(f"checkpoints/step-0000002/{MARKER}")
    assert remote.complete_dirs("checkpoints") == ["step-0000001"]
    remote.clear_partial("checkpoints")
    assert remote.list_dirs("checkpoints") == ["step-0000001"]


def test_pull_latest_restores_identical_bytes(remote):
    for step in (1, 2):
        files = make_ckpt(remote.local_dir / "checkpoints" / f"step-000000{step}", step)
        remote.commit_dir(f"checkpoints/step-000000{step}")
    (remote.local_dir / "checkpoints").rename(remote.local_dir.parent / "gone")  # a fresh machine
    local = remote.pull_latest("checkpoints")
    assert local == remote.local_dir / "checkpoints" / "step-0000002"
    assert read_tree(local) == files
    assert not list(local.parent.glob(".download-*"))


def test_download_flat_dir_and_single_file(remote):
    ckpt = remote.local_dir / "checkpoints" / "step-1"
    ckpt.mkdir(parents=True)
    (ckpt / "model.bin").write_bytes(b"\x00w1")
    (ckpt / MARKER).write_text("1")
    remote.commit_dir("checkpoints/step-1")
    remote.write_text("metrics.jsonl", '{"step": 1}\n')
    (remote.local_dir / "checkpoints").rename(remote.local_dir.parent / "gone")
    (remote.local_dir / "metrics.jsonl").unlink()
    assert read_tree(remote.pull_latest("checkpoints")) == {"model.bin": b"\x00w1", MARKER: b"1"}
    assert remote.download("metrics.jsonl").read_text() == '{"step": 1}\n'


def test_download_of_missing_remote_path_names_uri(remote):
    with pytest.raises(StorageError, match="downloading 'nope' at s3://bucket/run failed"):
        remote.download("nope")


def test_pull_latest_without_checkpoints_is_none(remote):
    assert remote.pull_latest("checkpoints") is None


def test_rotation_deletes_old_remote_dirs_in_step_order(remote):
    for step in (8, 9, 10, 11):
        make_ckpt(remote.local_dir / "checkpoints" / f"step-{step}", step)
        remote.commit_dir(f"checkpoints/step-{step}")
    remote.rotate("checkpoints", keep=2)
    assert remote.list_dirs("checkpoints") == ["step-10", "step-11"]


def test_recommit_hides_marker_until_files_are_in(remote, monkeypatch):
    make_ckpt(remote.local_dir / "checkpoints" / "step-0000004", 4)
    remote.commit_dir("checkpoints/step-0000004")
    seen, put = [], remote._put
    monkeypatch.setattr(remote, "_put", lambda local, dst: (
        seen.append(remote.exists(f"checkpoints/step-0000004/{MARKER}")), put(local, dst)))
    remote.commit_dir("checkpoints/step-0000004")
    assert not any(seen)
    assert remote.complete_dirs("checkpoints") == ["step-0000004"]


def test_upload_of_missing_path_names_it(remote):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        remote.upload("checkpoints/step-0000009")


# ---- errors --------------------------------------------------------------------------------------
def test_unknown_scheme_names_uri_and_remedy():
    with pytest.raises(StorageError, match=r"pyarrow could not open nosuch://b/run: .*credentials"):
        RunStorage("nosuch://b/run")


def test_an_upload_shows_its_bytes_only_where_progress_is_on(remote, capsys):
    files = make_ckpt(remote.local_dir / "ckpt", 3)
    remote.upload("ckpt")
    assert "upload ckpt" not in capsys.readouterr().err  # the default: no bar (CI, job logs)
    remote.progress = True
    remote.upload("ckpt")
    err = capsys.readouterr().err
    assert "upload ckpt" in err and f"{sum(map(len, files.values())) / 1000:.2f}k" in err, err
