#!/usr/bin/env bash
# Fourteenth session, one 4xH200 lease: run14e.sh on 2 of the GPUs (harness; bench new/before twice), then on all 4
# with before and new alternating three times (is the combine's spread in run14e_4 the new code's?).
set -u
NPROC=2 ORDER="new before new before" bash docs/results/2026-11-22-session14/run14e.sh
NPROC=4 ORDER="before new before new before new" bash -c 'sed "/crosscheck reference/d" docs/results/2026-11-22-session14/run14e.sh > /tmp/run14e_nocheck.sh; bash /tmp/run14e_nocheck.sh'
