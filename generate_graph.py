"""Write a topology file: ``python generate_graph.py --type regular -n 16 -o graphs/r.edges``."""

from dflsplit.cli_graph import generate_graph_main

raise SystemExit(generate_graph_main())
