"""JAX vs PyTorch step times: the same as `jaxbrats bench` (see `interop.benchmark` and docs/benchmarks/README.md).

python3 tools/bench_vs_torch.py --size 64 128 --batch 1 2 --vs torch --json bench.json
"""

import sys

from jaxbrats.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
