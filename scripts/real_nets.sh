#!/usr/bin/env bash
# Caffe's example nets on the full MNIST: convert the data, then the longer measurements.
#
#   scripts/real_nets.sh MNIST_DIR [STEP ...]
#
# MNIST_DIR holds the four IDX files (raw or .gz). Run from the repository root. STEPs run in
# the order given; by default all of these, in this order:
#   convert          data/mnist/mnist_{train,test}_lmdb and mnist_siamese_{train,test}_lmdb
#                    (siamese pairs drawn with seed $SIAMESE_SEED, test pairs with seed + 1)
#   autoencoder      solvers/mnist_autoencoder_solver.yaml, $AE_ITERS iterations (Caffe: 65,000)
#   siamese          solvers/mnist_siamese_solver.yaml, $SIAMESE_ITERS iterations (Caffe: 50,000)
#   lenet_adam lenet_rmsprop lenet_adadelta lenet_nesterov
#                    LeNet with solvers/lenet_solver_<name>.yaml, $LENET_ITERS iterations each
# Each training run displays every 100 iterations and writes snapshots/<step>.log (replaced
# when it exists; its weight snapshots go under snapshots/ too) and snapshots/<step>.curve.txt,
# the loss curve table of scripts/log_curve.py. Each step prints its wall time.
#
# Settings (environment): AE_ITERS (default 5000), SIAMESE_ITERS (5000), LENET_ITERS (10000),
# SIAMESE_SEED (0), TRAIN_ARGS (more `netforge train` arguments for every run, e.g.
# "--set test_interval=200"), NETFORGE (netforge command, default: netforge), PYTHON (python).
# Run it on a quiet machine: the numbers are timings as well as accuracies.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
MNIST_DIR=$1
shift
STEPS=("$@")
if [[ ${#STEPS[@]} -eq 0 ]]; then
    STEPS=(convert autoencoder siamese lenet_adam lenet_rmsprop lenet_adadelta lenet_nesterov)
fi

AE_ITERS=${AE_ITERS:-5000}
SIAMESE_ITERS=${SIAMESE_ITERS:-5000}
LENET_ITERS=${LENET_ITERS:-10000}
SIAMESE_SEED=${SIAMESE_SEED:-0}
read -r -a TRAIN_ARGS <<< "${TRAIN_ARGS:-}"
NETFORGE=${NETFORGE:-netforge}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)

mkdir -p snapshots

# train NAME SOLVER ITERS: one measurement, logged to snapshots/NAME.log.
train() {
    local name=$1 solver=$2 iters=$3
    local log=snapshots/$name.log
    echo "== $name: $solver, $iters iterations -> $log"
    local start=$SECONDS
    rm -f "$log"
    $NETFORGE train --solver "$solver" --set max_iter="$iters" --set display=100 \
        --log "$log" --no-progress ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
    "$PYTHON" "$HERE/log_curve.py" "$log" > "snapshots/$name.curve.txt"
    echo "   last rows of snapshots/$name.curve.txt:"
    head -1 "snapshots/$name.curve.txt"
    tail -3 "snapshots/$name.curve.txt"
    echo "== $name done in $((SECONDS - start)) s"
}

for step in "${STEPS[@]}"; do
    case $step in
        convert)
            start=$SECONDS
            $NETFORGE convert-mnist --from-dir "$MNIST_DIR" --out-dir data/mnist --overwrite
            $NETFORGE convert-mnist --siamese --seed "$SIAMESE_SEED" --from-dir "$MNIST_DIR" \
                --out-dir data/mnist --overwrite
            echo "== convert done in $((SECONDS - start)) s"
            ;;
        autoencoder)
            train mnist_autoencoder solvers/mnist_autoencoder_solver.yaml "$AE_ITERS" ;;
        siamese)
            train mnist_siamese solvers/mnist_siamese_solver.yaml "$SIAMESE_ITERS" ;;
        lenet_adam | lenet_rmsprop | lenet_adadelta | lenet_nesterov)
            train "$step" "solvers/lenet_solver_${step#lenet_}.yaml" "$LENET_ITERS" ;;
        *)
            echo "real_nets.sh: unknown step '$step'" >&2
            exit 2
            ;;
    esac
done
