"""Calibration text from another domain: Python source code of CPython's standard library (every install has it).

Writes a .txt file (documents separated by blank lines, as `rotsparse.data.load_texts` reads it) from a fixed list
of stdlib modules, to measure how `auto` fares when calibrated on code and evaluated on the embedded corpus' prose.
Usage: python eval/experiments/code_corpus.py OUT.txt
"""
import sys
import sysconfig
from pathlib import Path

MODULES = ("argparse.py", "dataclasses.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "csv.py",
           "fractions.py", "heapq.py", "bisect.py", "functools.py")

library = Path(sysconfig.get_paths()["stdlib"])
text = "\n\n".join((library / name).read_text(encoding="utf-8") for name in MODULES)
Path(sys.argv[1]).write_text(text, encoding="utf-8")
print(f"{sys.argv[1]}: {len(text)} characters from {len(MODULES)} stdlib modules")
