"""Run a script with every kernel compiled with -lineinfo (so compute-sanitizer names source lines):
    compute-sanitizer --tool racecheck python3 racecheck_lineinfo.py benchmarks/wkv7_tc_sweep.py --sanitize"""
import runpy
import sys

from rwkvops import _compile

_compile.get_function.__defaults__ = (_compile.OPTIONS + ("-lineinfo",),)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
