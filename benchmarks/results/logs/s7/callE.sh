# Session 7, device call E: wkv4_fwd_lbs at 574843d (3-word aggregate loads, late publication of the inclusive state)
# and its look-back batch sizes, against cb2f822's and 8621c06's kernels (tmp_variants/, carried); see wkv4_check.sh.
SWEEP="--variants auto --source base=tmp_variants/base.cu --source cb2f822=tmp_variants/cb2f822.cu
       --source b3=tmp_variants/b3.cu --source b4=tmp_variants/b4.cu --source b8=tmp_variants/b8.cu" \
  bash benchmarks/results/logs/s7/wkv4_check.sh
