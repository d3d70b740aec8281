"""Continue prompts with a trained model: see `llama_dist.generate.main`.

python launch/generate.py --checkpoint runs/x --tokenizer tok/tokenizer.model --prompt "Hi"
"""

from llama_dist.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
