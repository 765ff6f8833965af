"""
Download D4RL's MuJoCo datasets (HDF5) into data/, and find data from where users already have it.

    python download.py halfcheetah-expert-v2
    python download.py hopper-medium-replay-v2 --url https://mirror.example/hopper.hdf5
    python download.py --list                      # every D4RL dataset, with its size on the server

D4RL's qualities, per body: random (a random policy), medium (a policy trained to about a third of
the expert's return), expert, medium-replay (the replay buffer of the medium policy's training,
up to that point), medium-expert (D4RL's medium and expert files concatenated, half and half) and
full-replay (the whole replay buffer of an agent trained from scratch to the expert's level: every
return in between, the data on which asking for a return should give about that return).

train.py --data also takes, through locate():
    minari:mujoco/halfcheetah/expert-v0    a Minari dataset, from $MINARI_DATASETS_PATH or
                                          ~/.minari/datasets; downloaded with the minari package
                                          (pip install 'minari[hf]') when it is not there
    hf:halfcheetah-expert-v2               the Hugging Face dataset the original Decision
                                          Transformer blog trained on (Parquet; needs
                                          pip install huggingface_hub pyarrow)

Bytes are streamed into NAME.hdf5.part. A dropped or stalled connection is retried with backoff and
resumed where it stopped (HTTP Range); run the same command again to resume after giving up. The
file gets its final name only after it has the size the server announced and opens as a D4RL
dataset; its SHA-256 is then written to NAME.hdf5.sha256 and checked whenever the file is used again.
"""
import argparse
import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from common.datafiles import DataError, one_line, read_hdf5

BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"
BODIES = ("halfcheetah", "hopper", "walker2d")
QUALITIES = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")
# D4RL's own naming: halfcheetah-medium-replay-v2 is served as halfcheetah_medium_replay-v2.hdf5.
DATASETS = {
    f"{b}-{q}-v2": f"{BASE_URL}/{b}_{q.replace('-', '_')}-v2.hdf5" for b in BODIES for q in QUALITIES
}
OFFLINE_HINT = "Offline or host unreachable? Train on a local copy with: python train.py --data PATH"
HF_REPO = "edbeeching/decision_transformer_gym_replay"
HF_CONFIGS = [f"{b}-{q}-v2" for b in BODIES for q in ("medium", "medium-replay", "expert")]


class DownloadError(Exception):
    """A download that did not produce a complete, verified file; the message says why."""


class TransientError(Exception):
    """A failure worth retrying: the connection dropped, stalled or the server was busy."""


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def checksum_path(path):
    return Path(str(path) + ".sha256")


def check_recorded_sha256(path):
    """If a checksum was recorded when `path` was downloaded, the file must still match it."""
    recorded = checksum_path(path)
    if not recorded.exists():
        return
    expected = recorded.read_text().split()[:1]
    if [sha256_of(path)] != expected:
        raise DownloadError(f"{path}: its SHA-256 no longer matches the one recorded in {recorded} at "
                            f"download time, so the file was changed or damaged; delete both and download again")


def content_range(header):
    """'bytes 100-999/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    span, _, total = header.removeprefix("bytes ").partition("/")
    start = None if span == "*" else int(span.split("-")[0])
    return start, int(total) if total.isdigit() else None


def read_some(response):
    """The bytes that have arrived (up to 1 MiB): a stalled connection loses nothing received."""
    try:
        return response.read1(1 << 20)
    except (OSError, http.client.HTTPException) as e:  # reset, timed out, truncated
        raise TransientError(f"connection lost ({e})" if str(e) else "connection lost") from None


def fetch_into(part, url, timeout):
    """One attempt: append what the server has beyond `part`'s current size. Returns the full size
    the server announced (None if it did not say) once `part` holds that many bytes."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing beyond `have`: complete already, or a stale part file
            _, total = content_range(e.headers.get("Content-Range", ""))
            if total == have:
                return total
            part.unlink()
            raise TransientError("the partial file does not match the server's; starting over") from None
        if e.code in (408, 429) or e.code >= 500:
            raise TransientError(f"server answered {e.code} {e.reason}") from None
        raise DownloadError(f"{url}: server answered {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, socket.gaierror):  # no DNS: retrying will not help
            raise DownloadError(f"cannot reach {url} ({e.reason}). {OFFLINE_HINT}") from None
        raise TransientError(f"cannot connect ({e.reason})") from None
    except (OSError, http.client.HTTPException) as e:  # reset, timed out, closed before answering
        raise TransientError(f"no answer ({e})" if str(e) else "no answer") from None
    with response:
        if response.status == 206:
            start, total = content_range(response.headers.get("Content-Range", ""))
            if start != have:
                raise TransientError(f"server resumed at byte {start}, not {have}")
        else:  # 200: a server that ignores Range sends everything again, so start over
            have = 0
            total = int(response.headers["Content-Length"]) if response.headers["Content-Length"] else None
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5]) as bar:
            while chunk := read_some(response):
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise TransientError(f"connection ended after {got} of {total} bytes")
    if total is not None and got > total:
        part.unlink()
        raise DownloadError(f"{url}: server sent {got} bytes but announced {total}; nothing was saved")
    return total


def download(name, dest=None, url=None, timeout=30, retries=5, backoff=2.0):
    """Fetch dataset `name` (or `url`) to `dest` (default data/NAME.hdf5), verified; returns the path.

    A file already at `dest` is checked against its recorded SHA-256 instead of fetched again."""
    if url is None:
        if name not in DATASETS:
            raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
        url = DATASETS[name]
    dest = Path(dest or Path("data") / f"{name}.hdf5")
    if dest.exists():
        check_recorded_sha256(dest)
        return dest
    made_folder = not dest.parent.exists()
    try:
        return fetch_and_verify(url, dest, timeout, retries, backoff)
    except DownloadError:
        if made_folder and dest.parent.is_dir() and not any(dest.parent.iterdir()):
            dest.parent.rmdir()  # a failed download leaves nothing behind, not even an empty data/
        raise


def fetch_and_verify(url, dest, timeout, retries, backoff):
    part = Path(str(dest) + ".part")
    for attempt in range(retries + 1):
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fetch_into(part, url, timeout)
            break
        except OSError as e:  # network errors arrive as TransientError, so this is the local disk
            raise DownloadError(f"cannot write {part} ({e.strerror or e})") from None
        except TransientError as e:
            if attempt == retries:
                size = part.stat().st_size if part.exists() else 0
                kept = f"; the {size} bytes received are kept in {part}, run again to resume" if size else ""
                raise DownloadError(f"cannot download {url}: {e}, {retries + 1} attempts{kept}. "
                                    f"{OFFLINE_HINT}") from None
            wait = backoff * 2 ** attempt
            tqdm.write(f"download: {e}; retrying in {wait:g}s")
            time.sleep(wait)
    try:
        read_hdf5(part)  # every key D4RL promises, with consistent lengths and finite values
    except DataError as e:
        part.unlink()
        raise DownloadError(f"{url} is not a usable D4RL dataset, so nothing was saved: {e}") from None
    checksum_path(dest).write_text(f"{sha256_of(part)}  {dest.name}\n")  # sha256sum -c reads this
    os.replace(part, dest)
    return dest


def locate(spec):
    """train.py's --data as a user writes it -> a local path: minari:ID and hf:CONFIG are found or
    fetched, a missing data/NAME.hdf5 named after a D4RL dataset is downloaded, a file that was
    downloaded is checked against its recorded SHA-256, and anything else is returned as it is."""
    if spec.startswith("minari:"):
        return minari_dataset(spec.removeprefix("minari:"))
    if spec.startswith("hf:"):
        return hf_parquet(spec.removeprefix("hf:"))
    path = Path(spec)
    if path.is_file():
        check_recorded_sha256(path)
    elif not path.exists() and path.suffix == ".hdf5" and path.stem in DATASETS:
        download(path.stem, path)
    return path


def minari_dataset(dataset_id):
    """A Minari dataset's folder, where the minari package keeps it; fetched with that package
    (with its progress bar) when it is not on disk yet."""
    root = Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")
    folder = root / dataset_id
    if (folder / "data" / "main_data.hdf5").is_file():
        return folder
    try:
        import minari
    except ImportError:
        raise DownloadError(f"minari:{dataset_id} is not in {root}; pip install 'minari[hf]' and run again to "
                            f"download it, or point --data at the dataset's folder") from None
    try:
        minari.download_dataset(dataset_id)
    except ImportError as e:  # minari fetches through huggingface_hub, an extra of its own
        raise DownloadError(f"minari:{dataset_id} is not in {root}, and downloading it needs more: {one_line(e)}") from None
    except Exception as e:  # unknown id, no network: minari's own words, on one line
        raise DownloadError(f"cannot download minari:{dataset_id} ({one_line(e)}). {OFFLINE_HINT}") from None
    return folder


def hf_parquet(config):
    """The Parquet file of one configuration of the Hugging Face dataset, fetched into (or found
    in) the Hugging Face cache. Only Parquet: the dataset's pickle files are never loaded."""
    if config not in HF_CONFIGS:
        raise DownloadError(f"unknown Hugging Face configuration {config!r}; known: {', '.join(HF_CONFIGS)}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError(f"hf:{config} needs the huggingface_hub package: pip install huggingface_hub pyarrow "
                            f"(or download {config}/train/0000.parquet yourself and pass its path)") from None
    try:
        return Path(hf_hub_download(HF_REPO, f"{config}/train/0000.parquet", repo_type="dataset",
                                    revision="refs/convert/parquet"))
    except Exception as e:
        raise DownloadError(f"cannot download hf:{config} ({one_line(e)}). {OFFLINE_HINT}") from None


def remote_size(url, timeout=10):
    """The size the server announces for `url` (a HEAD request), or None when it does not answer."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            size = response.headers.get("Content-Length")
            return int(size) if size else None
    except (OSError, http.client.HTTPException, ValueError):
        return None


def list_datasets(timeout=10):
    """One line per D4RL dataset with its size on the server, asked for all at once."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = dict(zip(DATASETS, pool.map(lambda url: remote_size(url, timeout), DATASETS.values())))
    for name, size in sizes.items():
        print(f"{name:32s} {f'{size / 1e6:,.0f} MB' if size else 'size unknown (no answer)':>26}")
    if not any(sizes.values()):
        print(f"(no answer from {BASE_URL.split('/')[2]}: {OFFLINE_HINT})")


def main(argv=None):
    names = f"{{{','.join(BODIES)}}}-{{{','.join(QUALITIES)}}}-v2"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"datasets (NAME): {names}; --list gives their sizes")
    p.add_argument("name", nargs="?", metavar="NAME", help="a D4RL dataset, e.g. halfcheetah-expert-v2 (see --list)")
    p.add_argument("--list", action="store_true", help="list every D4RL dataset with its size, and exit")
    p.add_argument("--url", help="download from this address instead of D4RL's")
    p.add_argument("--out", help="destination file (default data/NAME.hdf5)")
    args = p.parse_args(argv)
    if args.list:
        list_datasets()
        return
    if args.name not in DATASETS:
        p.error(f"name a D4RL dataset (python download.py --list shows them all), not {args.name!r}"
                if args.name else "name a D4RL dataset to download, or --list")
    path = download(args.name, args.out, args.url)
    print(f"ready: {path} (SHA-256 in {checksum_path(path)})" if checksum_path(path).exists()
          else f"ready: {path}")


if __name__ == "__main__":
    try:
        main()
    except DownloadError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the bytes received so far are kept in the .part file; run again to resume")
