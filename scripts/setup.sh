#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with mlx_sa3 and everything it needs, then a demo file.
#
#   scripts/setup.sh            set up (.venv, system libraries, CPU torch on Linux, mlx_sa3) and write demo.wav
#   scripts/setup.sh --no-demo  set up only
#   scripts/setup.sh --dev      also the test extras (what scripts/test.sh uses)
#
# Environment: PYTHON (default python3, >= 3.10), VENV (default .venv), SA3_TORCH=skip to leave torch out (the demo
# and the MLX backend do not need it; the torch backend and its tests do). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

demo=1 extras="cpu,torch"
for arg in "$@"; do
    case "$arg" in
        --no-demo) demo=0 ;;
        --dev) extras="cpu,torch,dev" ;;
        *) echo "usage: scripts/setup.sh [--dev] [--no-demo]" >&2; exit 2 ;;
    esac
done
[ "${SA3_TORCH:-}" = skip ] && extras="${extras/,torch/}"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi; }

# -- system libraries (Linux): OpenBLAS (MLX's wheel bundles only the slow reference BLAS), libsndfile, venv ----------
has_lib() { { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q "$1"; }
system_packages() {
    [ "$(uname -s)" = Linux ] || return 0
    local missing=()
    has_lib libopenblas.so.0 || missing+=(libopenblas0-pthread)
    has_lib libsndfile.so.1 || missing+=(libsndfile1)
    "$PYTHON" -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
    [ ${#missing[@]} -eq 0 ] && return 0
    if command -v apt-get >/dev/null && as_root true; then
        say "installing system packages: ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        say "missing system packages: ${missing[*]}"
        say "  Debian/Ubuntu: sudo apt-get install ${missing[*]}"
        say "  Fedora: sudo dnf install openblas-threads libsndfile    Arch: sudo pacman -S openblas libsndfile"
        say "  continuing: without OpenBLAS MLX is ~40x slower; soundfile's wheel brings its own libsndfile"
    fi
}

# -- the virtual environment --------------------------------------------------------------------------------------
make_venv() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$PYTHON is $("$PYTHON" -V 2>&1); mlx_sa3 needs Python >= 3.10 (set PYTHON=...)"
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import pip" 2>/dev/null; then
        return 0
    fi
    say "creating $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || die "could not create $VENV (Debian/Ubuntu: apt-get install python3-venv)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
}

# -- torch: a CPU build on Linux (PyPI's Linux wheels are CUDA builds of several GB) --------------------------------
install_torch() {
    local pip=("$VENV/bin/python" -m pip install -q)
    if "$VENV/bin/python" -c "import torch" 2>/dev/null; then return 0; fi
    if [ "$(uname -s)" != Linux ]; then
        say "installing torch $TORCH_VERSION"
        "${pip[@]}" "torch==$TORCH_VERSION" || "${pip[@]}" "torch>=2.4"
        return
    fi
    # The +cpu local version exists only as a CPU build (PyPI cannot host it), so none of these can pull CUDA:
    # a wheel pip already finds (a local wheel or mirror), then PyTorch's CPU index, then its newest CPU build.
    say "installing torch $TORCH_VERSION (CPU build)"
    "${pip[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null \
        || "${pip[@]}" "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_CPU_INDEX" \
        || "${pip[@]}" torch --index-url "$TORCH_CPU_INDEX" \
        || die "could not install a CPU build of torch; install one by hand ($VENV/bin/pip install torch --index-url $TORCH_CPU_INDEX) or run with SA3_TORCH=skip"
}

system_packages
make_venv
[[ "$extras" == *torch* ]] && install_torch
say "installing mlx_sa3[$extras]"
"$VENV/bin/python" -m pip install -q -e ".[$extras]"
"$VENV/bin/python" -m mlx_sa3.info --size 512 >&2

if [ "$demo" = 1 ]; then
    say "generating demo.wav with the built-in demo model (random weights: it is noise, not music)"
    # demo.wav is this script's own output: replaced on every run
    "$VENV/bin/python" -m mlx_sa3.generate --model demo -p "warm analog synth pad" --duration 5 --seed 1 --quiet \
        --overwrite -o demo.wav
    say "done: demo.wav; next: $VENV/bin/python -m mlx_sa3.generate --help"
fi
