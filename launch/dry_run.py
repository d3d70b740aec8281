"""Per-rank memory of a layout, from the real parallelize code on the meta device:
python launch/dry_run.py --model 70b --world-size 2048 --tp 8"""

from llama_dist.parallel.dry_run import main

if __name__ == "__main__":
    raise SystemExit(main())
