# Session 7, device call C: the wkv4 forward change of cb2f822 (guarded output quotient, FAST flushing, token runs
# between checkpoints) against 8621c06's wkv4.cu (tmp_base/wkv4.cu, variant auto@base); see wkv4_check.sh.
SWEEP="--variants auto,auto@base --baseline-source tmp_base/wkv4.cu" bash benchmarks/results/logs/s7/wkv4_check.sh
