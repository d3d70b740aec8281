"""The chat-model alignment math: reward-model ranking losses and metrics (pure functions)."""
