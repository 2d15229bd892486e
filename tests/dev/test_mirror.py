"""The local HF mirror, exercised by the real huggingface_hub client over real HTTP."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from dev.demo_model import make_synthetic_repo, shard_name
from dev.mirror import MirrorServer
from dev.mirror_faults import CorruptFault, CutFault, ErrorFault, Faults
from dev.mirror_store import KiB, MiB, MirrorStore, git_blob_sha1_header, lfs_pointer
from serving.core.home import REPO_ROOT
from tests.mirror_fixtures import (
    BIG_SHARD,
    SHARD_COUNT,
    SMALL_SHARD,
    SYNTHETIC_SHARDS,
    SyntheticRepo,
    hf_env,
)

SUBPROCESS_TIMEOUT_S = 60
HF_CLIENT_CHUNK = 10 * MiB  # huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE


def files_under(root: Path) -> dict[str, bytes]:
    """Every downloaded file by repo path, without huggingface_hub's own `.cache` bookkeeping."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


def store_bytes(store: MirrorStore, repo: SyntheticRepo, sha: str, path: str) -> bytes:
    return store.file_path(repo.repo_id, sha, path).read_bytes()


def download(mirror: MirrorServer, repo: SyntheticRepo, tmp_path: Path, **kwargs: object) -> Path:
    return Path(
        hf_hub_download(
            repo.repo_id,
            endpoint=mirror.url,
            token=False,
            local_dir=tmp_path / "dl",
            cache_dir=tmp_path / "cache",
            **kwargs,  # type: ignore[arg-type]
        )
    )


def resolve_url(mirror: MirrorServer, repo: SyntheticRepo, revision: str, path: str) -> str:
    return f"{mirror.url}/{repo.repo_id}/resolve/{revision}/{path}"


# --------------------------------------------------------------------------------------------
# Core routes with the real client
# --------------------------------------------------------------------------------------------


def test_snapshot_by_branch_and_by_sha_give_identical_bytes(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    def snapshot(revision: str, name: str) -> dict[str, bytes]:
        path = snapshot_download(
            synthetic_repo.repo_id,
            revision=revision,
            endpoint=mirror.url,
            token=False,
            local_dir=tmp_path / name,
            cache_dir=tmp_path / "cache",
        )
        return files_under(Path(path))

    by_branch = snapshot("main", "by-branch")
    by_sha = snapshot(synthetic_repo.v2, "by-sha")

    assert by_branch == by_sha
    meta = mirror.store.revision(synthetic_repo.repo_id, synthetic_repo.v2)
    assert sorted(by_sha) == sorted(f.path for f in meta.files)
    for path, data in by_sha.items():
        assert data == store_bytes(mirror.store, synthetic_repo, synthetic_repo.v2, path)
    # v1 and v2 really differ, so "identical" above is not trivially true of any revision.
    assert by_sha[BIG_SHARD] != store_bytes(
        mirror.store, synthetic_repo, synthetic_repo.v1, BIG_SHARD
    )


def test_rerun_by_sha_makes_zero_requests(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    def snapshot() -> None:
        snapshot_download(
            synthetic_repo.repo_id,
            revision=synthetic_repo.v1,
            endpoint=mirror.url,
            token=False,
            local_dir=tmp_path / "dl",
            cache_dir=tmp_path / "cache",
        )

    snapshot()
    first = mirror.requests
    assert {r.method for r in first} == {"GET", "HEAD"}
    assert all(r.status in (200, 206) for r in first)
    mirror.clear_requests()

    snapshot()
    assert mirror.requests == []


def test_model_info_files_metadata_matches_files(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> None:
    info = HfApi(endpoint=mirror.url, token=False).model_info(
        synthetic_repo.repo_id, revision="v1", files_metadata=True
    )

    assert info.sha == synthetic_repo.v1
    assert info.id == synthetic_repo.repo_id
    assert info.private is False and info.gated is False
    assert info.siblings is not None
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == set(files_under(mirror.store.repo_dir(synthetic_repo.repo_id)
                                            / "revisions" / synthetic_repo.v1))  # fmt: skip
    lfs_count = 0
    for path, sibling in siblings.items():
        data = store_bytes(mirror.store, synthetic_repo, synthetic_repo.v1, path)
        assert sibling.size == len(data)
        if sibling.lfs is not None:
            lfs_count += 1
            sha256 = hashlib.sha256(data).hexdigest()
            assert sibling.lfs.sha256 == sha256
            assert sibling.lfs.size == len(data)
            pointer = lfs_pointer(sha256, len(data))
            assert sibling.lfs.pointer_size == len(pointer)
            git_pointer = git_blob_sha1_header(len(pointer)) + pointer
            assert sibling.blob_id == hashlib.sha1(git_pointer).hexdigest()
        else:
            git_blob = git_blob_sha1_header(len(data)) + data
            assert sibling.blob_id == hashlib.sha1(git_blob).hexdigest()
    assert lfs_count == SHARD_COUNT  # the small json files are plain git blobs


def test_model_info_head_check_with_expand_sha(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> None:
    api = HfApi(endpoint=mirror.url, token=False)

    info = api.model_info(synthetic_repo.repo_id, revision="main", expand=["sha"])
    query = mirror.requests[-1].query
    default = api.model_info(synthetic_repo.repo_id)  # no revision: GET /api/models/{id}

    assert info.sha == default.sha == synthetic_repo.v2
    assert info.siblings is None  # an expanded answer carries only what was asked
    assert default.siblings is not None
    assert query == "expand=sha"


def test_list_repo_refs(mirror: MirrorServer, synthetic_repo: SyntheticRepo) -> None:
    refs = HfApi(endpoint=mirror.url, token=False).list_repo_refs(synthetic_repo.repo_id)

    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [
        ("main", "refs/heads/main", synthetic_repo.v2)
    ]
    assert {t.name: t.target_commit for t in refs.tags} == {
        "v1": synthetic_repo.v1,
        "v2": synthetic_repo.v2,
    }
    assert refs.converts == []


def test_list_repo_tree(mirror: MirrorServer, synthetic_repo: SyntheticRepo) -> None:
    api = HfApi(endpoint=mirror.url, token=False)
    repo = synthetic_repo.repo_id

    recursive = {e.path: e for e in api.list_repo_tree(repo, recursive=True, revision="v2")}
    top = {e.path: e for e in api.list_repo_tree(repo, revision="v2")}
    nested = [e.path for e in api.list_repo_tree(repo, path_in_repo="nested", revision="v2")]

    assert isinstance(recursive["nested"], RepoFolder)
    assert isinstance(recursive["nested/notes.txt"], RepoFile)
    big = recursive[BIG_SHARD]
    assert isinstance(big, RepoFile) and big.lfs is not None
    assert big.size == big.lfs.size == SYNTHETIC_SHARDS[0]
    data = store_bytes(mirror.store, synthetic_repo, synthetic_repo.v2, BIG_SHARD)
    assert big.lfs.sha256 == hashlib.sha256(data).hexdigest()
    assert "nested/notes.txt" not in top and isinstance(top["nested"], RepoFolder)
    assert nested == ["nested/notes.txt"]


def test_range_requests_and_resolve_headers(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> None:
    url = resolve_url(mirror, synthetic_repo, "v1", BIG_SHARD)
    data = store_bytes(mirror.store, synthetic_repo, synthetic_repo.v1, BIG_SHARD)

    with httpx.Client() as client:
        head = client.head(url)
        middle = client.get(url, headers={"Range": "bytes=1000-1999"})
        tail = client.get(url, headers={"Range": f"bytes={len(data) - 10}-"})
        suffix = client.get(url, headers={"Range": "bytes=-7"})
        beyond = client.get(url, headers={"Range": f"bytes={len(data)}-"})

    sha256 = hashlib.sha256(data).hexdigest()
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == synthetic_repo.v1
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{sha256}"'
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(data))
    assert head.headers["Accept-Ranges"] == "bytes"
    assert middle.status_code == 206
    assert middle.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    assert middle.content == data[1000:2000]
    assert tail.status_code == 206 and tail.content == data[-10:]
    assert suffix.status_code == 206 and suffix.content == data[-7:]
    assert beyond.status_code == 416


def test_small_file_etag_is_git_blob_id(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> None:
    data = store_bytes(mirror.store, synthetic_repo, synthetic_repo.v1, "config.json")

    head = httpx.head(resolve_url(mirror, synthetic_repo, synthetic_repo.v1, "config.json"))

    blob_id = hashlib.sha1(git_blob_sha1_header(len(data)) + data).hexdigest()
    assert head.headers["ETag"] == f'"{blob_id}"'
    assert "X-Linked-Etag" not in head.headers


@pytest.mark.parametrize(
    ("repo_id", "revision", "filename", "error"),
    [
        ("test-org/no-such-repo", "main", "config.json", RepositoryNotFoundError),
        (None, "no-such-branch", "config.json", RevisionNotFoundError),
        (None, "0" * 40, "config.json", RevisionNotFoundError),
        (None, "main", "no-such-file.json", EntryNotFoundError),
    ],
)
def test_missing_things_raise_hub_errors(
    mirror: MirrorServer,
    synthetic_repo: SyntheticRepo,
    tmp_path: Path,
    repo_id: str | None,
    revision: str,
    filename: str,
    error: type[Exception],
) -> None:
    repo = repo_id or synthetic_repo.repo_id

    with pytest.raises(error):
        hf_hub_download(
            repo, filename, revision=revision, endpoint=mirror.url, token=False,
            local_dir=tmp_path / "dl", cache_dir=tmp_path / "cache",
        )  # fmt: skip
    if error is not EntryNotFoundError:
        with pytest.raises(error):
            HfApi(endpoint=mirror.url, token=False).model_info(repo, revision=revision)
    assert mirror.requests[0].status == 404


# --------------------------------------------------------------------------------------------
# Request log and faults
# --------------------------------------------------------------------------------------------


def test_request_log_over_python_and_http(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    download(mirror, synthetic_repo, tmp_path, filename="config.json", revision=synthetic_repo.v1)

    logged = httpx.get(f"{mirror.url}/_mirror/requests").json()
    cleared = httpx.post(f"{mirror.url}/_mirror/requests/clear")

    path = f"/{synthetic_repo.repo_id}/resolve/{synthetic_repo.v1}/config.json"
    assert [(r["method"], r["path"], r["status"]) for r in logged] == [
        ("HEAD", path, 200),
        ("GET", path, 200),
    ]
    assert [r.model_dump() for r in mirror.requests] == []  # cleared; control routes not logged
    assert cleared.status_code == 200


def test_throttle_slows_each_connection(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> None:
    url = resolve_url(mirror, synthetic_repo, "v1", SMALL_SHARD)
    rate = 512 * KiB  # 200 KiB at this rate takes ~0.4 s; unthrottled it takes milliseconds

    def timed_get() -> tuple[float, bytes]:
        began = time.monotonic()
        body = httpx.get(url).content
        return time.monotonic() - began, body

    _, fast_body = timed_get()
    mirror.set_faults(throttle_bytes_per_s=rate)
    slow_s, slow_body = timed_get()

    assert slow_body == fast_body
    # Only a floor: a busy machine slows the unthrottled fetch too, so no ratio holds.
    assert slow_s >= 0.9 * SYNTHETIC_SHARDS[2] / rate


def test_cut_breaks_the_transfer(mirror: MirrorServer, synthetic_repo: SyntheticRepo) -> None:
    mirror.set_faults(cut=CutFault(after_bytes=1000, paths=f"*/{BIG_SHARD}"))
    url = resolve_url(mirror, synthetic_repo, "v1", BIG_SHARD)

    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", url) as response:
        assert response.headers["Content-Length"] == str(SYNTHETIC_SHARDS[0])
        for chunk in response.iter_bytes():
            received += chunk
    assert len(received) == 1000
    # Unmatched paths are untouched.
    assert httpx.get(resolve_url(mirror, synthetic_repo, "v1", "config.json")).status_code == 200


def test_cut_once_is_resumed_by_the_client_with_range(mirror: MirrorServer, tmp_path: Path) -> None:
    # The client writes in 10 MiB chunks and resumes from the last whole chunk, so only a cut
    # past 10 MiB shows up as a Range request (an earlier cut restarts the file from zero).
    repo_id = "test-org/resume"
    sha = make_synthetic_repo(mirror.store, repo_id, [HF_CLIENT_CHUNK + 1 * MiB], seed=3)
    shard = shard_name(0, 1)
    mirror.set_faults(cut=CutFault(after_bytes=HF_CLIENT_CHUNK + 1 * KiB, paths="*.safetensors",
                                   times=1))  # fmt: skip

    path = hf_hub_download(
        repo_id, shard, revision=sha, endpoint=mirror.url, token=False,
        local_dir=tmp_path / "dl", cache_dir=tmp_path / "cache",
    )  # fmt: skip

    assert Path(path).read_bytes() == mirror.store.file_path(repo_id, sha, shard).read_bytes()
    gets = [r for r in mirror.requests if r.method == "GET"]
    assert [(r.status, r.range) for r in gets] == [(200, None), (206, f"bytes={HF_CLIENT_CHUNK}-")]


def test_error_status_fails_the_download(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    # GET only: the client retries a failing HEAD with backoff (seconds), but not a failing GET.
    mirror.set_faults(error=ErrorFault(status=503, paths="*/config.json", methods=["GET"]))

    with pytest.raises(HfHubHTTPError) as excinfo:
        download(mirror, synthetic_repo, tmp_path, filename="config.json", revision="v1")

    assert excinfo.value.response.status_code == 503
    assert [(r.method, r.status) for r in mirror.requests] == [("HEAD", 200), ("GET", 503)]


def test_error_status_only_first_k_times(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo
) -> None:
    mirror.set_faults(error=ErrorFault(status=500, times=2))
    url = resolve_url(mirror, synthetic_repo, "v1", "config.json")

    statuses = [httpx.get(url).status_code for _ in range(3)]

    assert statuses == [500, 500, 200]


def test_corrupt_keeps_size_but_changes_bytes(
    mirror: MirrorServer, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    mirror.set_faults(corrupt=CorruptFault(paths="*.safetensors"))

    path = download(mirror, synthetic_repo, tmp_path, filename=BIG_SHARD, revision="v1")

    good = store_bytes(mirror.store, synthetic_repo, synthetic_repo.v1, BIG_SHARD)
    got = path.read_bytes()
    assert len(got) == len(good)  # the client's size check passes...
    assert got != good  # ...yet the content is wrong: only a hash check catches it
    assert hashlib.sha256(got).hexdigest() != hashlib.sha256(good).hexdigest()


def test_faults_over_http(mirror: MirrorServer, synthetic_repo: SyntheticRepo) -> None:
    faults = Faults(throttle_bytes_per_s=10 * KiB, error=ErrorFault(status=502, paths="*/refs"))

    set_response = httpx.post(f"{mirror.url}/_mirror/faults", content=faults.model_dump_json())
    refs_status = httpx.get(f"{mirror.url}/api/models/{synthetic_repo.repo_id}/refs").status_code
    read_back = httpx.get(f"{mirror.url}/_mirror/faults").json()
    invalid = httpx.post(f"{mirror.url}/_mirror/faults", json={"throttle_bytes_per_s": -1})
    deleted = httpx.delete(f"{mirror.url}/_mirror/faults")

    assert set_response.status_code == 200
    assert refs_status == 502
    assert Faults.model_validate(read_back) == faults
    assert invalid.status_code == 422
    assert deleted.status_code == 200 and mirror.faults == Faults()


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


def test_store_is_deterministic_and_hardlinks(tmp_path: Path) -> None:
    shards = [64 * KiB, 1 * KiB]
    sha_a = make_synthetic_repo(MirrorStore(tmp_path / "a"), "org/m", shards, seed=7)
    sha_b = make_synthetic_repo(MirrorStore(tmp_path / "b"), "org/m", shards, seed=7)
    sha_c = make_synthetic_repo(MirrorStore(tmp_path / "c"), "org/m", shards, seed=8)

    store = MirrorStore(tmp_path / "d")
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\x01" * 100)
    sha = store.add_revision("org/m", {"weights.bin": source, "config.json": b"{}"}, tags=["t"])
    served = store.file_path("org/m", sha, "weights.bin")

    assert sha_a == sha_b != sha_c
    assert served.stat().st_ino == source.stat().st_ino  # hardlinked, not copied
    assert store.resolve("org/m", "t") == store.resolve("org/m", "main") == sha
    assert store.revision("org/m", sha).file("weights.bin").lfs is not None  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        store.add_revision("org/m", {"../escape": b"x"})


# --------------------------------------------------------------------------------------------
# As processes, configured only through HF_ENDPOINT
# --------------------------------------------------------------------------------------------

CLIENT_SCRIPT = """
import json, sys
from pathlib import Path
from huggingface_hub import HfApi, snapshot_download
repo, out = sys.argv[1], Path(sys.argv[2])
sha = HfApi().model_info(repo, revision="main", expand=["sha"]).sha
path = snapshot_download(repo, revision=sha, local_dir=out)
print(json.dumps({"sha": sha, "files": sorted(
    p.relative_to(path).as_posix() for p in Path(path).rglob("*")
    if p.is_file() and ".cache" not in p.parts)}))
"""


def test_mirror_process_serves_client_configured_by_hf_endpoint(
    mirror_store: MirrorStore, synthetic_repo: SyntheticRepo, tmp_path: Path
) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "dev.mirror", "--root", str(mirror_store.root), "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = json.loads(server.stdout.readline())["url"]
        client = subprocess.run(
            [sys.executable, "-c", CLIENT_SCRIPT, synthetic_repo.repo_id, str(tmp_path / "dl")],
            env=hf_env(url, tmp_path / "hf-home"),
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
    finally:
        server.terminate()
        server.wait(timeout=SUBPROCESS_TIMEOUT_S)

    assert client.returncode == 0, client.stderr
    result = json.loads(client.stdout.strip().splitlines()[-1])
    assert result["sha"] == synthetic_repo.v2
    meta = mirror_store.revision(synthetic_repo.repo_id, synthetic_repo.v2)
    assert result["files"] == sorted(f.path for f in meta.files)
    assert server.returncode == 0
