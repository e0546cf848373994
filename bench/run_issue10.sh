#!/usr/bin/env bash
# Issue 10 benchmark (protocol cpu-recon-v2; see bench/recon_grid.py): each reconstruction loss with the
# guard on, its verdicts and cost, and WikiText-2 perplexity at the calibration length (256) and 4x it
# (1024) besides the protocol's 512. Start one worker per core: OMP_NUM_THREADS=1 bash bench/run_issue10.sh
set -euo pipefail
cd "$(dirname "$0")/.."
C=--contexts=256+1024
G=--guard=revert
export PROTOCOL=cpu-recon-v2
export RUNS=${RUNS:-"dense:$C wanda-br-gp:--loss=token-mse,$G,$C wanda-br-gp:--loss=mse,$G,$C wanda-lr:$C \
sparsegpt-br-gp:--loss=token-mse,$G,$C wanda-br-gp:--loss=cosine,$G,$C wanda-br-gp:--loss=kd,$G,$C \
sparsegpt-lr:$C sparsegpt-br-gp:--loss=mse,$G,$C \
wanda-br-gp:--loss=token-mse,$G,$C,--lr=0.001,--epochs=4 wanda-br-gp-cr:--loss=token-mse,$G,$C \
sparsegpt-br-gp-cr:--loss=token-mse,$G,$C"}
exec bash bench/run_recon_grid.sh
