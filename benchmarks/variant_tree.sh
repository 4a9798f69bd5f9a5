#!/usr/bin/env bash
# A copy of this tree's rwkvops/, cuda_src/ and benchmarks/ in /tmp/t_LABEL with some files replaced, for A/B runs of
# kernel variants on one device (run each copy's benchmark one after the other).  Prints the copy's path.
#   d=$(bash benchmarks/variant_tree.sh old tmp_variants/head/wkv6.cu:cuda_src/wkv6.cu)
#   (cd $d && PYTHONPATH=.:benchmarks python3 benchmarks/ab_time.py old)
set -eu
label=$1; shift
d=/tmp/t_$label
rm -rf "$d"; mkdir -p "$d"
cp -r rwkvops cuda_src benchmarks "$d"/
for pair in "$@"; do cp "${pair%%:*}" "$d/${pair#*:}"; done
echo "$d"
