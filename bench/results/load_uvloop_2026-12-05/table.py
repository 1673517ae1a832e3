"""This folder's runs as the README's table, by ../load_crowded_2026-12-05/table.py. Usage: python table.py"""
import os
import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ["RUNS_DIR"] = str(HERE)
runpy.run_path(str(HERE.parent / "load_crowded_2026-12-05" / "table.py"), run_name="__main__")
