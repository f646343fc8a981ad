#!/usr/bin/env bash
# The GPU check, in one call on a machine with python3 + a CUDA torch that may lack hydra-core, omegaconf and wandb
# (as the lent GPU machine does): the CUDA-only tests, then `bench/gpu.py --check` (the main job on cuda, 124M at
# B=16/32/64 and B=auto, gpt2-medium, a resume across a restart), one line per figure, in under 8 minutes on an H100.
#
#   bash bench/gpu_check.sh --stage [WHEELS_DIR]   # here, once: copies the hydra-core/omegaconf/antlr4 wheels
#                                                  # (default ../shared/wheels) into .gpu_wheels/, git-excluded
#   bash bench/gpu_check.sh [--dry-run] [--wheels DIR] [--site DIR] [-- GPU.PY OPTIONS]   # on the GPU machine
#
# With the device tool: run(command="bash bench/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=540). Nothing is
# downloaded: the wheels go into --site (/tmp/site) with pip --no-index --no-deps, the project too (--no-deps
# --no-build-isolation), on PYTHONPATH; runs use logger.mode=disabled. The runs' output goes to $OUT/gpu_check.log
# where $OUT is set (the device tool brings it back), else to a temp dir. Exit code: 0 all passed, 1 something
# failed, 2 no CUDA device or no wheels.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=$REPO/.gpu_wheels
SITE=/tmp/site
PY=${PYTHON:-python3}
DRY=
GPU_ARGS=()

die() { echo "error: $*" >&2; exit 2; }
run() {  # print the command; run it unless --dry-run
    echo "+ $*"
    [[ -n $DRY ]] || "$@"
}

stage() {
    local from=${1:-$REPO/../shared/wheels}
    compgen -G "$from/*.whl" >/dev/null || die "no wheels in $from; give the folder holding hydra_core, omegaconf and antlr4 wheels: bash bench/gpu_check.sh --stage DIR"
    mkdir -p "$WHEELS"
    cp "$from"/*.whl "$WHEELS"/
    local exclude
    exclude=$(git -C "$REPO" rev-parse --git-path info/exclude)
    [[ $exclude = /* ]] || exclude=$REPO/$exclude
    mkdir -p "$(dirname "$exclude")"
    grep -qxF "/.gpu_wheels/" "$exclude" 2>/dev/null || echo "/.gpu_wheels/" >>"$exclude"
    echo "staged $(ls "$WHEELS" | wc -l) wheels in .gpu_wheels/ (git-excluded); carry it: run(..., carry=[\".gpu_wheels\"])"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --stage) shift; stage "$@"; exit 0 ;;
        --dry-run) DRY=1; GPU_ARGS+=(--dry-run) ;;
        --wheels) WHEELS=$(cd "$2" && pwd); shift ;;
        --site) SITE=$2; shift ;;
        --) shift; GPU_ARGS+=("$@"); break ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1'; bash bench/gpu_check.sh --help lists them" ;;
    esac
    shift
done

cd "$REPO"
if [[ -z $DRY ]]; then
    cuda=$("$PY" -c 'import torch; print("yes" if torch.cuda.is_available() else "no", torch.__version__, torch.version.cuda)') \
        || die "$PY cannot import torch"
    read -r available torch_version cuda_version <<<"$cuda"
    [[ $available == yes ]] || die "no CUDA device: torch $torch_version (CUDA $cuda_version) sees no GPU; run this on a GPU machine (--dry-run prints the commands)"
fi

# hydra-core, omegaconf and antlr4 from the staged wheels, where python3 lacks them; then the project, without deps
if [[ -n $DRY ]] || ! "$PY" -c 'import hydra, omegaconf' 2>/dev/null; then
    [[ -n $DRY ]] || compgen -G "$WHEELS/*.whl" >/dev/null \
        || die "$PY lacks hydra-core/omegaconf and $WHEELS holds no wheels: run 'bash bench/gpu_check.sh --stage' where ../shared/wheels is, and carry .gpu_wheels"
    run "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
fi
run "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" "$REPO"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled

status=0
# The CUDA-only tests: those that skip without a GPU, in the files that have any. -P and --import-mode=append: the
# installed gpt_exp (with its configs, gpt_exp.conf) comes before the checkout's.
cuda_tests=$(grep -l "cuda.is_available()" tests/test_*.py | tr '\n' ' ')
log=${OUT:-$(mktemp -d)}/cuda_tests.log
if [[ -n $DRY ]]; then
    echo "+ $PY -P -m pytest -q -p no:cacheprovider --import-mode=append -k cuda $cuda_tests"
else
    "$PY" -P -m pytest -q -p no:cacheprovider --import-mode=append -k cuda $cuda_tests >"$log" 2>&1 || status=1
    echo "cuda tests ($cuda_tests): $(tail -n 1 "$log")"
    [[ $status == 0 ]] || grep -E "^(FAILED|ERROR)" "$log" | head -n 5 || true
fi

"$PY" bench/gpu.py --check "${GPU_ARGS[@]}" | tee "${TMPDIR:-/tmp}/gpu_check.out" || status=1
grep -qE "FAILED|: FAIL$" "${TMPDIR:-/tmp}/gpu_check.out" && status=1
exit $status
