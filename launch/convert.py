"""Convert between llama_dist checkpoints and HF Llama folders (llama_dist.checkpoint.convert)."""

from llama_dist.checkpoint.convert import main

raise SystemExit(main())
