"""The prototyping workbench: diff specs (diff.py), compare them over seeds (compare.py, delong.py,
variants.py) and analyze trained runs (analyze.py). Only diff.py is torch-free."""
