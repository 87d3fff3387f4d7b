"""Generation: the loop (when to retrieve, what the model sees, token choice, events) over a backend that
keeps a cache and returns next-token logits. ``kv`` and ``passages`` are the only code that touches a PyTorch
KV cache; ``llamacpp`` drives llama.cpp's with the same arithmetic."""
