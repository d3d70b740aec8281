"""Chat with a trained model in the terminal: see `llama_dist.chat_cli.main`.

python launch/chat.py --checkpoint runs/sft/checkpoints --system "You are a helpful assistant."
"""

from llama_dist.chat_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
