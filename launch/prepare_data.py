"""Tokenize .txt/.jsonl corpora into a Megatron indexed dataset: see `llama_dist.data.prepare`.

python launch/prepare_data.py --input corpus/ --out data/corpus --tokenizer tok/tokenizer.model
"""

from llama_dist.data.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
