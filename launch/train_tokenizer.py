"""Train a Llama-2-style SentencePiece tokenizer: see `llama_dist.tokenizer.main`.

python launch/train_tokenizer.py --input corpus.txt --out tok/tokenizer.model --vocab-size 8000
"""

from llama_dist.tokenizer import main

if __name__ == "__main__":
    raise SystemExit(main())
