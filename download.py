"""
Download D4RL's MuJoCo datasets (HDF5) into data/.

    python download.py halfcheetah-expert-v2
    python download.py hopper-medium-replay-v2 --url https://mirror.example/hopper.hdf5

The file is streamed into NAME.hdf5.part and renamed only once it is complete, so an interrupted
download never leaves a file that looks finished.
"""
import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"
BODIES = ("halfcheetah", "hopper", "walker2d")
QUALITIES = ("random", "medium", "medium-replay", "medium-expert", "expert")
# D4RL's own naming: halfcheetah-medium-replay-v2 is served as halfcheetah_medium_replay-v2.hdf5.
DATASETS = {
    f"{b}-{q}-v2": f"{BASE_URL}/{b}_{q.replace('-', '_')}-v2.hdf5" for b in BODIES for q in QUALITIES
}


class DownloadError(Exception):
    """A download that did not produce a complete file; the message says why."""


def download(name, dest=None, url=None, timeout=60):
    """Fetch dataset `name` (or `url`) to `dest` (default data/NAME.hdf5); returns the path."""
    if url is None:
        if name not in DATASETS:
            raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
        url = DATASETS[name]
    dest = Path(dest or Path("data") / f"{name}.hdf5")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = Path(str(dest) + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with open(part, "wb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        got = part.stat().st_size
        if size is not None and got != size:
            raise DownloadError(f"{url}: got {got} bytes of {size}; try again")
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot download {url} ({reason}). Offline? Pass a local file with "
                            f"--data PATH") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(DATASETS), metavar="NAME", help="e.g. halfcheetah-expert-v2")
    p.add_argument("--url", help="download from this address instead of D4RL's")
    p.add_argument("--out", help="destination file (default data/NAME.hdf5)")
    args = p.parse_args(argv)
    print(f"saved {download(args.name, args.out, args.url)}")


if __name__ == "__main__":
    try:
        main()
    except DownloadError as e:
        sys.exit(f"error: {e}")
