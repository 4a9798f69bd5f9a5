# Session 7, device call F: wkv4_fwd_lbs at fc4720a (w, u loads before the row copies) against 574843d, cb2f822 and
# 8621c06 (tmp_variants/, carried), and ncu of the default at B=1 T=16384; see wkv4_check.sh.
SWEEP="--variants auto --source base=tmp_variants/base.cu --source cb2f822=tmp_variants/cb2f822.cu
       --source 574843d=tmp_variants/574843d.cu" NCU=1 bash benchmarks/results/logs/s7/wkv4_check.sh
